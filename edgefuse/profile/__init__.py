"""Profile: latency, memory and per-operator time of ONNX graphs, side by side, on x86 or ARM.

Takes graph paths and a :class:`~edgefuse.config.profile.ProfileConfig`; gives a
:class:`~edgefuse.profile.results.ProfileResult` (interleaved ratios, per-op times, output parity).

Modules: ``api`` (:func:`profile_onnx`), ``graphs`` (inputs and feeds), ``stats`` (latency statistics),
``macs`` (MAC counts and bounds), ``results``, ``arm`` (the emulated arm64 sandbox), ``targets`` (local,
emulated, ssh), ``runner`` (the self-contained onnxruntime runner copied to every target).

The public names load lazily (PEP 562), so importing the package imports no heavy library:

    >>> import edgefuse.profile as stage
    >>> "ProfileConfig" in dir(stage)
    True
"""

from __future__ import annotations

from edgefuse.lazy import lazy_exports

# public name -> module that defines it
_LAZY: dict[str, str] = {
    "Environment": "edgefuse.profile.results",
    "GraphProfile": "edgefuse.profile.results",
    "LatencyPoint": "edgefuse.profile.results",
    "MemoryPoint": "edgefuse.profile.results",
    "MemoryResult": "edgefuse.profile.results",
    "NodeStat": "edgefuse.profile.results",
    "OpProfile": "edgefuse.profile.results",
    "OpStat": "edgefuse.profile.results",
    "OutputParity": "edgefuse.profile.results",
    "ParityResult": "edgefuse.profile.results",
    "ProfileConfig": "edgefuse.profile.api",
    "ProfileResult": "edgefuse.profile.api",
    "profile_onnx": "edgefuse.profile.api",
}

__all__ = sorted(_LAZY)

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
