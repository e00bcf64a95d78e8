"""Configuration of the profile stage (latency, memory, per-operator time; local, emulated arm64 or ssh)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from edgefuse.config import StrictModel

ArmCpu = Literal["neoverse-n1", "cortex-a72"]
ARM_CPUS: tuple[str, ...] = ("neoverse-n1", "cortex-a72")
OptLevel = Literal["disable", "basic", "extended", "all"]
OPT_LEVELS: tuple[str, ...] = ("disable", "basic", "extended", "all")
# ssh://user@host[:port]; the user and host are restricted to characters that cannot start an ssh option
# or carry shell syntax (they still reach ssh as separate list items, never through a shell).
SSH_TARGET_RE = re.compile(r"^ssh://(?P<user>[A-Za-z0-9._][A-Za-z0-9._-]*)@(?P<host>[A-Za-z0-9._][A-Za-z0-9._-]*)"
                           r"(?::(?P<port>[0-9]{1,5}))?$")


class ProfileConfig(StrictModel):
    """How to profile ONNX graphs. Several graphs are timed interleaved and compared with the first one.

    Example:
        >>> ProfileConfig(threads=[1], batch_sizes=[1], sequence_lengths=[16], runs=3).target
        'local'
    """

    target: str = Field(
        "local",
        description="Where the graphs run: 'local' (this machine, native), 'arm64-emulated' (an arm64 sandbox under "
        "qemu-user; correctness only, its timings are labelled emulated) or 'ssh://user@host[:port]' (a real device).",
    )
    cpu: ArmCpu = Field(
        "neoverse-n1",
        description="arm64-emulated only: the CPU model qemu emulates, with a matching fake /proc/cpuinfo "
        "(neoverse-n1: dot-product int8 kernels, like Graviton2; cortex-a72: Raspberry Pi 4 class, no dot product).",
    )
    provider: str = Field("CPUExecutionProvider", description="onnxruntime execution provider.")
    threads: list[int] | None = Field(
        None, description="intra-op thread counts to sweep; null sweeps 1 .. the target's available cores."
    )
    batch_sizes: list[int] = Field([1], min_length=1, description="Batch sizes to sweep (the first is used for "
                                    "the per-operator profile, the memory baseline and the parity check).")
    sequence_lengths: list[int] = Field([128], min_length=1, description="Sequence lengths to sweep.")
    warmup_runs: int = Field(5, ge=0, description="Untimed runs of every graph before each measurement point.")
    runs: int = Field(20, ge=1, description="Timed runs per graph and point (the maximum when time_budget_s is set).")
    clock: Literal["wall", "cpu"] = Field(
        "wall",
        description="The clock of the headline latency and ratio figures; both are always recorded. cpu: the "
        "calling thread's CPU time when every graph runs with 1 intra-op thread, the whole process's otherwise; a "
        "preempted, shared machine or CI runner does not inflate it (wall clock overstated a 0.31x speedup as 0.22x "
        "on a loaded 2-core host). wall: elapsed time, what a user waits.",
    )
    time_budget_s: float | None = Field(
        None, gt=0, description="Stop timing a point after this many seconds (but not before min_runs rounds)."
    )
    min_runs: int = Field(3, ge=1, description="Fewest timed rounds per point when time_budget_s is set.")
    graph_optimization_level: OptLevel = Field("all", description="onnxruntime graph optimisation level.")
    allow_spinning: bool = Field(
        False, description="Let idle intra-op threads spin (faster on a dedicated machine, unfair on a shared one)."
    )
    session_config: dict[str, str] = Field(
        default_factory=dict,
        description="Extra onnxruntime session config entries, e.g. {'mlas.disable_kleidiai': '1'}.",
    )
    op_profile: bool = Field(True, description="Record per-operator time from onnxruntime's profiler.")
    op_profile_runs: int = Field(5, ge=1, description="Runs averaged in the per-operator profile.")
    keep_trace: bool = Field(
        False, description="Keep onnxruntime's raw profiler trace of every graph (Chrome trace JSON: open it in "
        "Perfetto or chrome://tracing); profile_onnx copies it into its trace_dir and the report links it."
    )
    top_nodes: int = Field(25, ge=1, description="Slowest nodes kept per graph in the per-node table.")
    memory: bool = Field(True, description="Measure peak memory, one fresh process per graph.")
    memory_runs: int = Field(3, ge=1, description="Runs per shape in the memory process.")
    check_outputs: bool = Field(
        True, description="Compare every graph's outputs on the target with the first graph's outputs on this "
        "machine (the x86 fp32 reference when the first graph is fp32)."
    )
    min_cosine: float | None = Field(
        0.99, ge=-1.0, le=1.0, description="Fail (ProfileError) when a graph's output cosine against the reference "
        "is below this; null only reports it."
    )
    parity_metric: Literal["flat", "mean_pooled"] = Field(
        "mean_pooled", description="Which cosine min_cosine checks: 'mean_pooled' (outputs of shape (batch, seq, "
        "...) averaged over seq first, as a sentence embedding; other outputs flat) or 'flat' (every element). "
        "Per-channel int8 MiniLM scores 0.993 pooled but 0.988 flat, so 'flat' with 0.99 fails healthy int8 graphs."
    )
    inputs_npz: Path | None = Field(
        None, description="A .npz of real inputs (arrays named like the graph inputs, shape (batch, seq)); replaces "
        "the random inputs and the batch/sequence grid."
    )
    seed: int = Field(0, description="Seed of the random inputs.")
    timeout_s: float = Field(3600.0, gt=0, description="Wall-clock limit of one runner process.")
    arm_cache_dir: Path | None = Field(
        None, description="Where the arm64 sandbox is built and cached; null: $EDGEFUSE_CACHE or ~/.cache/edgefuse."
    )
    arm_onnxruntime_version: str | None = Field(
        None, description="onnxruntime version installed in the arm64 sandbox; null: the same as on this machine."
    )
    arm_debian_suite: str = Field("bookworm", pattern=r"^[a-z]+$", description="Debian release of the sandbox.")
    ssh_identity_file: Path | None = Field(None, description="ssh private key (-i); null: ssh's default keys.")
    ssh_known_hosts_file: Path | None = Field(
        None, description="known_hosts file used with StrictHostKeyChecking=yes; null: ~/.ssh/known_hosts."
    )
    ssh_python: str = Field("python3", description="Python on the device (needs numpy and onnxruntime).")
    ssh_connect_timeout_s: int = Field(10, ge=1, description="ssh ConnectTimeout.")

    @field_validator("threads", "batch_sizes", "sequence_lengths")
    @classmethod
    def _positive(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and (not value or any(v < 1 for v in value)):
            raise ValueError(f"must be a non-empty list of positive integers, got {value}")
        return value

    @field_validator("target")
    @classmethod
    def _target(cls, value: str) -> str:
        if value in ("local", "arm64-emulated") or SSH_TARGET_RE.match(value):
            return value
        raise ValueError(f"target must be 'local', 'arm64-emulated' or 'ssh://user@host[:port]', got {value!r}")

    @model_validator(mode="after")
    def _port(self) -> ProfileConfig:
        port = self.ssh_parts()[2] if self.target.startswith("ssh://") else None
        if port is not None and not 1 <= port <= 65535:
            raise ValueError(f"ssh port must be 1..65535, got {port} in {self.target!r}")
        return self

    @property
    def emulated(self) -> bool:
        """True when the timings come from qemu, not from a real CPU."""
        return self.target == "arm64-emulated"

    def ssh_parts(self) -> tuple[str, str, int | None]:
        """(user, host, port or None) of an ``ssh://`` target.

        Example:
            >>> ProfileConfig(target="ssh://pi@10.0.0.2:2222").ssh_parts()
            ('pi', '10.0.0.2', 2222)
        """
        m = SSH_TARGET_RE.match(self.target)
        if m is None:
            raise ValueError(f"not an ssh target: {self.target!r}")
        return m["user"], m["host"], int(m["port"]) if m["port"] else None
