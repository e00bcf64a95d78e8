"""CPU presets of the quantize stage: int8 data types per target, and the host's preset from its CPU flags.

One table, one line of rationale per entry (optimum's ``AutoQuantizationConfig`` has one function per target).
Weights are signed int8 on every target: optimum's avx2 preset uses uint8 weights, which measured about 2x
slower on MiniLM (26.9 ms vs 13 ms, measured). ``reduce_range`` (7-bit weights, against the int16
saturation of the u8 x s8 instruction VPMADDUBSW that AVX2 and AVX-512 without VNNI use) is **on** for the
``avx2`` and ``avx512`` presets: measured on an AVX2-only AMD EPYC (benchmarks/results/export.md), SmolLM2-135M's
dynamic int8 graph went from next-token-logit cosine -0.28 (no token agrees with fp32) to 0.86 with it, while
MiniLM lost only 0.0005 (pooled cosine 0.9903 -> 0.9898). A model that is accurate without it can turn it off
(``QuantizeConfig.reduce_range=False``, ``--no-reduce-range``). VNNI and ARM64 kernels accumulate in int32 and
keep full 8-bit weights. Decoders with "massive activations" also need their few outlier MatMuls kept out of
int8; the auto mode (``auto_target_cosine``) finds them without hand-written exclusions.

Example:
    >>> PRESETS["arm64"].weight
    'QInt8'
    >>> preset_from_flags("x86_64", {"avx2", "avx512f", "avx512bw", "avx512_vnni"})
    'avx512-vnni'
"""

from __future__ import annotations

import platform
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgefuse.errors import ConfigError


@dataclass(frozen=True)
class QuantPreset:
    """int8 settings for one target CPU."""

    name: str
    activation_dynamic: str  # ORT QuantType name for dynamic activations (ORT requires uint8 there)
    activation_static: str  # QDQ activations
    weight: str
    reduce_range: bool
    rationale: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


PRESETS: dict[str, QuantPreset] = {
    # dotprod/I8MM kernels take u8 x s8 without saturation; no reduce_range needed on ARM64
    "arm64": QuantPreset("arm64", "QUInt8", "QInt8", "QInt8", False,
                         "ARM64 dot-product kernels: u8 activations x s8 weights, no saturation"),
    # VPMADDUBSW sums u8*s8 pairs into int16 and saturates on real decoders (SmolLM2: cosine -0.28 -> 0.86 with
    # reduce_range, module docstring); static QDQ keeps u8 activations: s8 x s8 has no fast x86 kernel without VNNI
    "avx2": QuantPreset("avx2", "QUInt8", "QUInt8", "QInt8", True,
                        "AVX2: u8 x s8 (VPMADDUBSW) sums pairs in int16: 7-bit weights avoid saturation"),
    # AVX-512BW without VNNI: the same instruction, 64 bytes wide
    "avx512": QuantPreset("avx512", "QUInt8", "QUInt8", "QInt8", True,
                          "AVX-512 without VNNI: as AVX2, 64 bytes wide, 7-bit weights"),
    # VNNI (VPDPBUSD) accumulates in int32: full 8-bit weights are safe
    "avx512-vnni": QuantPreset("avx512-vnni", "QUInt8", "QInt8", "QInt8", False,
                               "AVX-512 VNNI accumulates u8 x s8 in int32: full 8-bit weights"),
}


def preset_from_flags(machine: str, flags: set[str]) -> str:
    """The preset for a CPU with ``platform.machine()`` value ``machine`` and ``/proc/cpuinfo`` flags ``flags``."""
    if machine.lower() in ("aarch64", "arm64", "armv8l", "armv8b"):
        return "arm64"
    if "avx512_vnni" in flags or "avx512vnni" in flags or "avx_vnni" in flags:
        # AVX-VNNI (Alder Lake and later) has the same non-saturating int32 accumulation at 256 bits
        return "avx512-vnni"
    if "avx512bw" in flags:
        return "avx512"
    return "avx2"  # also the safe choice for older x86: reduce_range avoids saturation everywhere


def host_cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The CPU feature flags of this host (``flags`` on x86, ``Features`` on ARM); empty if unreadable."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            return set(value.split())
    return set()


def detect_host_preset() -> str:
    """The preset that fits this machine (``platform.machine()`` and its CPU flags)."""
    return preset_from_flags(platform.machine(), host_cpu_flags())


def resolve_preset(name: str) -> QuantPreset:
    """``auto`` -> the host's preset; any other name -> that preset (for cross builds).

    Raises:
        ConfigError: an unknown preset name.
    """
    key = detect_host_preset() if name == "auto" else name
    if key not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of auto, {', '.join(PRESETS)}")
    return PRESETS[key]
