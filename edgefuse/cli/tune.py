"""``edgefuse tune``: the fastest graph of an export folder that passes its gate, measured on the target."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

HELP = """Build candidate graphs of an export folder (onnxruntime fusion subsets x int8 modes x per-channel /
per-tensor) with their session options (disabled optimizers such as SkipLayerNormFusion, spinning, threads),
reject every candidate whose output cosine against the fp32 graph (or accuracy drop) misses the gate, time the
rest interleaved on the target (CPU time by default), and write the winner into the folder as model_tuned.onnx
with its session options in manifest.json; tune_report.md / .json list every candidate and why the winner won.

`edgefuse profile` runs the tuned graph with its session options; edgefuse.ort.session(folder) opens it the
same way. Targets: local, ssh://user@host[:port] (a real device). arm64-emulated is refused: qemu checks numerics
only (use `edgefuse profile --target arm64-emulated` for that).

examples:
  edgefuse tune out/minilm-onnx
  edgefuse tune out/minilm-onnx --budget-s 30 --seq-len 32 --candidates int8 int8-noskipfusion opt-int8
  edgefuse tune out/sst2-onnx --eval-data data/sst2/validation.tsv --max-accuracy-drop 0.01
  edgefuse tune out/minilm-onnx --target ssh://pi@10.0.0.2 --ssh-identity ~/.ssh/id_ed25519
  edgefuse tune out/minilm-onnx --config tune.yaml --overwrite   # candidates: [{name: ..., fusions: ...}]
"""


def register(sub: Any) -> None:
    p = sub.add_parser("tune", help="choose the fastest gated graph + session options on the target",
                       description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("export_dir", help="folder written by `edgefuse export`")
    p.add_argument("--config", type=Path, metavar="YAML", help="tune settings file (keys of TuneConfig)")
    p.add_argument("--candidates", nargs="+", metavar="NAME",
                   help="a subset of the default candidates by name (see --dry-run for the list)")
    p.add_argument("--budget-s", type=float, help="seconds of interleaved timing for all candidates (default 60)")
    p.add_argument("--threads", type=int, help="intra-op threads the candidates are timed with (default 1)")
    p.add_argument("--batch-size", type=int, help="batch size timed (default 1)")
    p.add_argument("--seq-len", dest="sequence_length", type=int, help="tokens timed (default 128)")
    p.add_argument("--clock", choices=("cpu", "wall"), help="ranking clock (default cpu)")
    p.add_argument("--min-cosine", type=float, help="gate: mean output cosine against fp32 (default 0.99)")
    p.add_argument("--calibration-data", type=Path, metavar="FILE", help="texts for the gate and static calibration")
    p.add_argument("--eval-data", type=Path, metavar="TSV", help="labelled TSV for an accuracy gate")
    p.add_argument("--max-accuracy-drop", type=float, help="gate: fp32 accuracy minus candidate accuracy")
    p.add_argument("--target", help="local (default) or ssh://user@host[:port]")
    p.add_argument("--ssh-identity", help="ssh private key for an ssh:// target")
    p.add_argument("--ssh-known-hosts", help="known_hosts file with the device's host key")
    p.add_argument("--overwrite", action="store_true", default=None, help="replace an earlier tuned graph and report")
    p.add_argument("--dry-run", action="store_true", help="print the resolved settings and candidates, build nothing")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    p.set_defaults(run=run)


_KEYS = ("budget_s", "threads", "batch_size", "sequence_length", "clock", "min_cosine", "calibration_data",
         "eval_data", "max_accuracy_drop", "target", "overwrite")


def _config(args: argparse.Namespace) -> Any:
    from pydantic import ValidationError

    from edgefuse.config.messages import validation_message
    from edgefuse.config.tune import TuneConfig
    from edgefuse.errors import ConfigError
    from edgefuse.io_utils import read_yaml_mapping

    values: dict[str, Any] = read_yaml_mapping(Path(args.config)) if args.config is not None else {}
    values.update({k: getattr(args, k) for k in _KEYS if getattr(args, k) is not None})
    ssh = {"ssh_identity_file": args.ssh_identity, "ssh_known_hosts_file": args.ssh_known_hosts}
    if any(v is not None for v in ssh.values()):
        values["profile_settings"] = {**values.get("profile_settings", {}),
                                      **{k: v for k, v in ssh.items() if v is not None}}
    try:
        return TuneConfig(**values)
    except ValidationError as exc:
        raise ConfigError(validation_message(exc, "tune", TuneConfig)) from None


def resolve_candidates(cfg: Any, folder: Path, names: list[str] | None) -> Any:
    """``cfg`` with its candidate list resolved: ``names`` pick from the folder's default set (or the config's).

    Raises:
        ConfigError: a name that is not a candidate (the message lists the names).
    """
    from edgefuse.errors import ConfigError
    from edgefuse.manifest import read_manifest
    from edgefuse.optimize.fusions import ort_model_type_or_none
    from edgefuse.tune.candidates import default_candidates

    manifest = read_manifest(folder)
    ort_type = ort_model_type_or_none(str(manifest.get("model_type", "?")))
    pool = list(cfg.candidates) if cfg.candidates is not None else default_candidates(
        ort_type, manifest.get("task", "feature-extraction"))
    if names is None:
        return cfg.model_copy(update={"candidates": pool})
    known = {c.name: c for c in pool}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(f"--candidates {' '.join(unknown)}: not a candidate of this folder; choose from "
                          f"{', '.join(known)}")
    return cfg.model_copy(update={"candidates": [known[n] for n in dict.fromkeys(names)]})


def run(args: argparse.Namespace) -> int:
    cfg = resolve_candidates(_config(args), Path(args.export_dir), args.candidates)
    if args.dry_run:
        print(json.dumps(cfg.model_dump(mode="json"), indent=2, default=str))
        return 0
    from edgefuse.tune.api import tune_folder
    from edgefuse.tune.report import markdown

    res = tune_folder(Path(args.export_dir), cfg)
    print(json.dumps(res.to_dict(), indent=2, default=str) if args.json else markdown(res))
    return 0
