"""``edgefuse profile``: latency, memory and per-operator time of ONNX graphs, side by side, on x86 or ARM."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from edgefuse.cli.options import Flag, add_flags, flag_values, format_table
from edgefuse.config.profile import ProfileConfig

# the ProfileConfig keys this command sets (type, choices and help come from the config); --min-cosine also
# takes 'none', so it is read by hand; every other key can be given with --set KEY=VALUE
PROFILE_FLAGS = (
    Flag("target"),
    Flag("cpu"),
    Flag("threads", metavar="N"),
    Flag("batch_sizes", metavar="B"),
    Flag("sequence_lengths", "--seq-lens", metavar="S"),
    Flag("runs"),
    Flag("warmup_runs"),
    Flag("time_budget_s"),
    Flag("clock"),
    Flag("graph_optimization_level", "--opt-level"),
    Flag("parity_metric"),
    Flag("inputs_npz", metavar="NPZ"),
    Flag("memory", "--no-memory", negate=True, extra="Give --no-memory to skip it."),
    Flag("op_profile", "--no-op-profile", negate=True, extra="Give --no-op-profile to skip it."),
    Flag("check_outputs", "--no-check-outputs", negate=True, extra="Give --no-check-outputs to skip it."),
    Flag("keep_trace"),
    Flag("ssh_identity_file", "--ssh-identity", metavar="KEY"),
    Flag("ssh_known_hosts_file", "--ssh-known-hosts", metavar="FILE"),
    Flag("ssh_python"),
)

HELP = """Profile ONNX graphs: latency (mean, std, p50/p90/p99, throughput) over thread, batch and sequence
grids, model load time, file size, peak memory (one fresh process per graph, the runtime's own baseline apart),
per-operator time (which MatMuls are quantized, which fp32) and output parity against the first graph.

Several graphs are timed interleaved (A B A B ...) in one process and compared with the FIRST graph, so pass
the reference first (e.g. fp32 before int8, unfused before fused).

targets:
  local                      this machine, native
  arm64-emulated             an arm64 sandbox under qemu-user (built once, cached): checks that the graphs load
                             and agree with x86; its timings are EMULATED, never device latency
  ssh://user@host[:port]     a real device: graphs + one runner script are copied to a temporary folder there

examples:
  edgefuse profile out/minilm.onnx out/minilm_int8.onnx --threads 1 2 --runs 50
  edgefuse profile out/onnx/ --batch-sizes 1 8 --seq-lens 32 128 --out reports/x86
  edgefuse profile plain_int8.onnx fused_int8.onnx --target arm64-emulated --cpu neoverse-n1 --runs 3
  edgefuse profile model.onnx --target ssh://pi@192.168.1.20 --ssh-identity ~/.ssh/id_ed25519 --json
"""


def register(sub: Any) -> None:
    p = sub.add_parser("profile", help="latency / memory / per-op profile of ONNX graphs (x86, ARM, ssh)",
                       description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("graphs", nargs="+", metavar="GRAPH_OR_FOLDER", help=".onnx files or folders (reference first)")
    add_flags(p, ProfileConfig, PROFILE_FLAGS)
    p.add_argument("--min-cosine", metavar="COS", help=ProfileConfig.model_fields["min_cosine"].description
                   + " Give 'none' to only report it.")
    p.add_argument("--config", help="YAML with profile keys (top level, or under a 'profile:' section)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config as YAML and run nothing")
    p.add_argument("-o", "--out", help="write profile.json and report.{json,md,html} into this folder")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--json", action="store_true", help="print the full result as JSON on stdout")
    p.set_defaults(run=run)


def build_config(args: argparse.Namespace) -> Any:
    """The :class:`ProfileConfig` from ``--config``, the flags, then ``--set`` (later wins)."""
    from pydantic import ValidationError

    from edgefuse.errors import ConfigError

    data: dict[str, Any] = {}
    if args.config:
        data = _read_yaml(Path(args.config))
    data.update(flag_values(args, PROFILE_FLAGS))
    if args.min_cosine is not None:
        data["min_cosine"] = None if args.min_cosine.lower() == "none" else _float(args.min_cosine, "--min-cosine")
    if args.set:
        from edgefuse.config.pipeline import apply_overrides

        data = apply_overrides(data, args.set)
    try:
        return ProfileConfig.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(x) for x in err["loc"]) or "profile"
        msg = str(err["msg"]).removeprefix("Value error, ")
        allowed = f"; allowed keys: {', '.join(ProfileConfig.model_fields)}" if err["type"] == "extra_forbidden" else ""
        raise ConfigError(f"profile config: {loc}: {msg} (got {err.get('input')!r}){allowed}") from None


def _float(text: str, flag: str) -> float:
    from edgefuse.errors import ConfigError

    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"{flag} must be a number or 'none', got {text!r}") from None


def _read_yaml(path: Path) -> dict[str, Any]:
    from edgefuse.io_utils import read_yaml_mapping

    data = read_yaml_mapping(path)
    section = data.get("profile", data) if "profile" in data else data
    return {k: v for k, v in section.items() if k != "schema_version"} if isinstance(section, dict) else {}


def summary(result: Any) -> str:
    """A small human table: one row per graph and measured point (threads, batch x sequence): p50, ratio to the
    reference, size, memory, cosine."""
    from edgefuse.report.doc import fmt_mib, fmt_ms, fmt_num, fmt_ratio, target_label

    d = result.to_dict()
    env = d["environment"]
    clock = (d.get("config") or {}).get("clock", "wall")
    lat = ("emulated " if env["emulated"] else "") + ("p50 CPU ms" if clock == "cpu" else "p50 ms")
    rows = [("graph", "threads", "b x s", lat, f"vs {d['reference_label']}", "file MiB", "peak RSS MiB", "cosine")]
    for g in d["graphs"]:
        for p in g["latency"] or [{}]:  # one row per measured point, not only the headline
            rows.append((g["label"], str(p.get("threads", "-")), f"{p.get('batch_size')}x{p.get('sequence_length')}",
                         fmt_ms(p.get("latency_ms_p50")), fmt_ratio(p.get("ratio_vs_reference_p50")),
                         f"{g['file_size_bytes'] / 2**20:.2f}", fmt_mib((g.get("memory") or {}).get("peak_rss_mib")),
                         fmt_num((g.get("parity") or {}).get("min_cosine"))))
    return target_label(env) + "\n" + format_table(rows)


def write_outputs(result: Any, out: Path, overwrite: bool, inputs: Any = (), traces: Path | None = None) -> None:
    """``profile.json`` + the report files (+ ``traces/``), all or nothing (one atomic folder)."""
    import shutil

    from edgefuse.io_utils import atomic_dir, write_json_atomic
    from edgefuse.report.api import write_report

    with atomic_dir(out, overwrite=overwrite, inputs=inputs) as tmp:
        write_json_atomic(tmp / "profile.json", result.to_dict())
        if traces is not None and traces.is_dir():
            shutil.copytree(traces, tmp / traces.name)
        write_report([result], tmp)


def run(args: argparse.Namespace) -> int:
    cfg = build_config(args)
    if args.dry_run:
        import yaml

        print(yaml.safe_dump({"profile": cfg.model_dump(mode="json")}, sort_keys=False), end="")
        return 0
    if args.out:  # before any graph is timed
        from edgefuse.io_utils import check_output_dir

        check_output_dir(Path(args.out), overwrite=args.overwrite, inputs=args.graphs)
    import tempfile

    from edgefuse.errors import ProfileError
    from edgefuse.profile.api import profile_onnx

    if cfg.keep_trace and not args.out:
        from edgefuse.errors import ConfigError

        raise ConfigError("--keep-trace needs --out DIR (the traces are written to DIR/traces/)")
    with tempfile.TemporaryDirectory(prefix="edgefuse-traces-") as tmp:
        traces = Path(tmp) / "traces" if cfg.keep_trace else None
        try:
            result = profile_onnx(args.graphs, cfg, trace_dir=traces)
        except ProfileError as exc:
            partial = getattr(exc, "result", None)
            if partial is not None:  # the parity check failed: keep what was measured, then fail
                if args.out:
                    write_outputs(partial, Path(args.out), args.overwrite, args.graphs, traces)
                print(json.dumps(partial.to_dict(), indent=2) if args.json else summary(partial))
            raise
        if args.out:
            write_outputs(result, Path(args.out), args.overwrite, args.graphs, traces)
    print(json.dumps(result.to_dict(), indent=2) if args.json else summary(result))
    return 0
