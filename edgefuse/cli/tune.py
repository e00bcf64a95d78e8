"""``edgefuse tune``: the fastest graph of an export folder that passes its gate, measured on the target."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from edgefuse.cli.options import Flag, add_flags, config_from_args
from edgefuse.config.tune import TuneConfig

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


# the TuneConfig keys this command sets (type, choices and help come from the config); --candidates and the ssh
# options are its own (see register); the rest (timing rounds, sample counts, output name, seed) is left to YAML
TUNE_FLAGS = (
    Flag("budget_s", metavar="S"),
    Flag("threads", metavar="N"),
    Flag("batch_size", metavar="N"),
    Flag("sequence_length", "--seq-len", metavar="N"),
    Flag("clock"),
    Flag("min_cosine", metavar="COS"),
    Flag("calibration_data", metavar="FILE"),
    Flag("eval_data", metavar="TSV"),
    Flag("max_accuracy_drop", metavar="DROP"),
    Flag("target", metavar="TARGET"),
    Flag("overwrite"),
)


def register(sub: Any) -> None:
    p = sub.add_parser("tune", help="choose the fastest gated graph + session options on the target",
                       description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("export_dir", help="folder written by `edgefuse export`")
    p.add_argument("--config", type=Path, metavar="YAML", help="tune settings file (keys of TuneConfig)")
    # hand-written: --candidates picks names from the default set (resolve_candidates), not the config's list of
    # candidate sections; the ssh options are keys of the profile_settings mapping, which no Flag can address
    p.add_argument("--candidates", nargs="+", metavar="NAME",
                   help="a subset of the default candidates by name (see --dry-run for the list)")
    add_flags(p, TuneConfig, TUNE_FLAGS)
    p.add_argument("--ssh-identity", help="ssh private key for an ssh:// target")
    p.add_argument("--ssh-known-hosts", help="known_hosts file with the device's host key")
    p.add_argument("--dry-run", action="store_true", help="print the resolved settings and candidates, build nothing")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    p.set_defaults(run=run)


def _config(args: argparse.Namespace) -> Any:
    ssh = {"ssh_identity_file": args.ssh_identity, "ssh_known_hosts_file": args.ssh_known_hosts}
    ssh = {k: v for k, v in ssh.items() if v is not None}
    extra = {"profile_settings": ssh} if ssh else None  # merged into the file's profile_settings
    return config_from_args(args, TuneConfig, TUNE_FLAGS, section="tune", extra=extra)


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
