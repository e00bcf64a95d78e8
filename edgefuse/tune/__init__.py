"""Tune: the fastest graph of an export folder that still passes its accuracy gate, chosen by measurement.

Takes an export folder and a :class:`~edgefuse.config.tune.TuneConfig`; builds candidate graphs (onnxruntime
fusion subsets x int8 modes x per-channel/per-tensor) each with its session options (disabled optimizers,
spinning, threads), rejects every candidate below the cosine/accuracy gate against the fp32 graph, times the rest
interleaved on the target that will run them (CPU time by default), and writes the winner
(``model_tuned.onnx``) with its session options into the folder and its manifest, plus ``tune_report.json`` /
``tune_report.md``. :func:`edgefuse.ort.session` opens the folder the tuned way.

Modules: ``candidates`` (the default set, building one candidate), ``gate`` (numerics against fp32),
``api`` (:func:`tune_folder`), ``report`` (results and the Markdown table).

The public names load lazily (PEP 562), so importing the package imports no heavy library:

    >>> import edgefuse.tune as stage
    >>> "tune_folder" in dir(stage)
    True
"""

from __future__ import annotations

from edgefuse.lazy import lazy_exports

# public name -> module that defines it
_LAZY: dict[str, str] = {
    "CandidateResult": "edgefuse.tune.report",
    "TuneResult": "edgefuse.tune.report",
    "default_candidates": "edgefuse.tune.candidates",
    "tune_folder": "edgefuse.tune.api",
}

__all__ = sorted(_LAZY)

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
