"""The two exporters behind ``edgefuse export``: optimum-onnx's (preferred) and torch.onnx's (fallback).

optimum-onnx knows the input/output conventions that ``ORTModelFor*`` expect and builds the KV-cache graph
(``text-generation-with-past``). It has no entry for the MoE decoders the fusion supports, so those are
exported with optimum's config of the dense sibling (one adapter line each, below), whose inputs and outputs
are the same. Where optimum cannot serve at all (e.g. an encoder-decoder used for feature extraction), the
torch exporter writes a graph of the model's plain ``forward``. Both trace with TorchScript by default, which
records the fusion scale's forward pre-hook as an elementwise ``Mul``.
"""

from __future__ import annotations

import inspect
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from edgefuse.config.export import ExportConfig
from edgefuse.errors import ConfigError, MissingDependencyError
from edgefuse.fusion.archs import MLP_SPECS
from edgefuse.manifest import FP32_GRAPH

logger = logging.getLogger(__name__)

ONNX_NAME = FP32_GRAPH  # the one name of the fp32 graph (edgefuse.manifest)
TORCH_DEFAULT_OPSET = 18
# optimum-onnx has no ONNX config for these model types; the dense sibling's config has identical inputs and
# outputs (the MoE block is internal to each layer), so it serves as is. Read from each ArchSpec.optimum_type.
OPTIMUM_CONFIG_ALIASES: dict[str, str] = {
    t: s.optimum_type for t, s in MLP_SPECS.items() if s.optimum_type is not None
}
_OPTIMUM_TASK = {"feature-extraction": "feature-extraction", "sequence-classification": "text-classification"}


def optimum_task(cfg: ExportConfig) -> str:
    """optimum's task name for an edgefuse task."""
    if cfg.task == "causal-lm":
        return "text-generation-with-past" if cfg.with_past else "text-generation"
    return _OPTIMUM_TASK[cfg.task]


def _optimum_model_type(model_type: str) -> str:
    return OPTIMUM_CONFIG_ALIASES.get(model_type, model_type).replace("_", "-")


def optimum_supports(model: Any, cfg: ExportConfig) -> bool:
    """Whether optimum-onnx (with edgefuse's aliases) has an ONNX config for this model type and task."""
    try:
        import optimum.exporters.onnx.model_configs  # noqa: F401  (importing it registers the ONNX configs)
        from optimum.exporters.tasks import TasksManager
    except ImportError:
        return False
    mtype = _optimum_model_type(model.config.model_type)
    if mtype not in TasksManager._SUPPORTED_MODEL_TYPE:
        return False
    tasks = TasksManager.get_supported_tasks_for_model_type(mtype, "onnx", library_name="transformers")
    return optimum_task(cfg) in tasks


def _custom_configs(model: Any, task: str) -> dict[str, Any] | None:
    """optimum ONNX config of the dense sibling for an aliased MoE model type (None for native types)."""
    model_type = model.config.model_type
    if model_type not in OPTIMUM_CONFIG_ALIASES:
        return None
    from optimum.exporters.tasks import TasksManager

    ctor = TasksManager.get_exporter_config_constructor(
        "onnx", task=task, model_type=_optimum_model_type(model_type), library_name="transformers"
    )
    # task and use_past are bound by the constructor; past inputs must be asked for, as optimum does for decoders
    kwargs = {"use_past_in_inputs": True} if task.endswith("-with-past") else {}
    return {"model": ctor(model.config, **kwargs)}


def export_with_optimum(model: Any, cfg: ExportConfig, out: Path) -> str:
    """Export with optimum-onnx into ``out`` (config, generation config and the source's tokenizer included);
    optimum's own validation is off: edgefuse validates, and fails instead of warning."""
    try:
        from optimum.exporters.onnx import onnx_export_from_model
    except ImportError:
        raise MissingDependencyError(
            "the optimum exporter needs: pip install 'optimum-onnx[onnxruntime]==0.1.0'"
        ) from None
    task = optimum_task(cfg)
    custom = _custom_configs(model, task)
    kwargs: dict[str, Any] = {"custom_onnx_configs": custom} if custom else {}
    if custom:  # optimum treats aliased types as custom architectures: it needs the submodel list spelled out
        kwargs["fn_get_submodels"] = lambda m: {"model": m}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings about shape-dependent Python branches; validation decides
        onnx_export_from_model(model, out, task=task, opset=cfg.opset, do_validation=False, **kwargs)
    version = metadata.version("optimum-onnx")
    mtype = model.config.model_type
    alias = f", {mtype} via the {_optimum_model_type(mtype)} config" if custom else ""
    return f"optimum-onnx {version} (onnx_export_from_model, task {task}{alias}; torch.onnx TorchScript tracer)"


class _TaskWrapper(torch.nn.Module):
    """Named tensor inputs in, the task's one output tensor out (what ``torch.onnx.export`` wants)."""

    def __init__(self, model: Any, input_names: list[str], output: str) -> None:
        super().__init__()
        self.model, self.input_names, self.output = model, input_names, output
        # no KV cache in a plain graph: a cache object is not a tensor output
        self.no_cache = "use_cache" in inspect.signature(model.forward).parameters

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        kwargs: dict[str, Any] = dict(zip(self.input_names, args, strict=True))
        if self.no_cache:
            kwargs["use_cache"] = False
        return getattr(self.model(**kwargs), self.output)


def export_with_torch(model: Any, cfg: ExportConfig, out: Path) -> str:
    """Export ``model.forward`` with ``torch.onnx.export`` (dynamic batch and sequence axes) into ``out``."""
    if cfg.task == "causal-lm" and cfg.with_past:
        raise ConfigError(
            f"the torch exporter cannot build a KV-cache graph for {model.config.model_type!r}; pass "
            "--no-past (with_past: false) or use an architecture optimum-onnx supports"
        )
    output = "last_hidden_state" if cfg.task == "feature-extraction" else "logits"
    names = ["input_ids", "attention_mask"]
    if getattr(model.config, "is_encoder_decoder", False):
        names.append("decoder_input_ids")
    batch, seq = 2, 16
    gen = torch.Generator().manual_seed(cfg.seed)
    vocab = int(getattr(model.config, "vocab_size", 100))
    dummy = {"input_ids": torch.randint(3, vocab, (batch, seq), generator=gen),
             "attention_mask": torch.ones(batch, seq, dtype=torch.long)}
    dummy["decoder_input_ids"] = dummy["input_ids"][:, :4]
    args = tuple(dummy[n] for n in names)
    wrapper = _TaskWrapper(model, names, output).eval()
    opset = cfg.opset or TORCH_DEFAULT_OPSET
    path = out / ONNX_NAME
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")
        if cfg.torch_dynamo:
            b, s = torch.export.Dim("batch", min=1, max=1024), torch.export.Dim("sequence", min=2, max=4096)
            shapes = {n: {0: b, 1: s} for n in names}
            if "decoder_input_ids" in shapes:
                shapes["decoder_input_ids"] = {0: b}
            program = torch.onnx.export(wrapper, args, input_names=names, output_names=[output],
                                        dynamic_shapes=shapes, opset_version=opset, dynamo=True, optimize=True)
            program.save(str(path))
        else:
            axes = {n: {0: "batch_size", 1: "sequence_length"} for n in names}
            if "decoder_input_ids" in axes:
                axes["decoder_input_ids"] = {0: "batch_size", 1: "decoder_sequence_length"}
            axes[output] = {0: "batch_size"} if output == "logits" and cfg.task != "causal-lm" else {
                0: "batch_size", 1: "decoder_sequence_length" if "decoder_input_ids" in names else "sequence_length"}
            torch.onnx.export(wrapper, args, str(path), input_names=names, output_names=[output],
                              dynamic_axes=axes, opset_version=opset, dynamo=False, do_constant_folding=True)
    model.config.save_pretrained(out)
    if getattr(model, "generation_config", None) is not None and cfg.task == "causal-lm":
        model.generation_config.save_pretrained(out)
    tracer = "dynamo" if cfg.torch_dynamo else "TorchScript tracer"
    return f"torch.onnx {torch.__version__} ({tracer}, opset {opset})"


_NO_ATTR = object()


@contextmanager
def preserved_forwards(model: torch.nn.Module) -> Iterator[None]:
    """Restore every module's instance-level ``forward`` on exit (error included).

    optimum's ``ModelPatcher`` "restores" a decoder's forward by setting an instance attribute that is its own
    ``traceable_check_model_inputs`` wrapper (transformers >= 4.54), not the class forward: without this, the
    caller's model would keep running optimum's wrapper after export (and validation would test the wrapper).

    Example:
        >>> lin = torch.nn.Linear(2, 2)
        >>> with preserved_forwards(lin):
        ...     lin.forward = lambda x: x
        >>> "forward" in lin.__dict__
        False
    """
    saved = [(m, m.__dict__.get("forward", _NO_ATTR)) for m in model.modules()]
    try:
        yield
    finally:
        for module, previous in saved:
            if previous is _NO_ATTR:
                module.__dict__.pop("forward", None)
            else:
                module.__dict__["forward"] = previous


def export_graph(model: Any, cfg: ExportConfig, out: Path) -> str:
    """Export ``model`` to ``out/model.onnx`` with the configured exporter; return which one was used.

    The model's modules keep their own forwards afterwards (see :func:`preserved_forwards`).

    Raises:
        ConfigError: ``exporter="optimum"`` for a model type/task optimum-onnx cannot export.
    """
    use_optimum = cfg.exporter == "optimum" or (cfg.exporter == "auto" and optimum_supports(model, cfg))
    if cfg.exporter == "optimum" and not optimum_supports(model, cfg):
        raise ConfigError(
            f"optimum-onnx cannot export model type {model.config.model_type!r} for task {optimum_task(cfg)!r}; "
            "use exporter 'auto' or 'torch'"
        )
    with preserved_forwards(model):
        if use_optimum:
            return export_with_optimum(model, cfg, out)
        logger.info("optimum-onnx has no config for %s / %s: using torch.onnx", model.config.model_type, cfg.task)
        return export_with_torch(model, cfg, out)
