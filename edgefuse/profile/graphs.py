"""Host-side graph handling: find the graphs, read their inputs and ops with ``onnx``, make the input feeds.

The runner on the target gets every input as a ready ``.npz`` (made here, seeded), so the same token ids reach
every graph and every machine: that is what makes the interleaved timings and the parity check comparable.
"""

from __future__ import annotations

import json
import logging
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgefuse.errors import ConfigError, DataError, TargetNotFoundError
from edgefuse.profile.runner.ort_runner import FP_MATMULS, QUANTIZED_MATMULS

logger = logging.getLogger(__name__)

_NP_TYPES = {1: np.float32, 10: np.float16, 11: np.float64, 6: np.int32, 7: np.int64, 9: np.bool_, 2: np.uint8,
             3: np.int8}


@dataclass(frozen=True)
class InputSpec:
    """One graph input: ``dims`` holds ints (fixed) and 'batch' / 'sequence' for symbolic dims."""

    name: str
    elem_type: int
    dims: tuple[int | str, ...]
    int_high: int | None  # exclusive upper bound for token ids (the embedding table's rows), if known


@dataclass(frozen=True)
class GraphInfo:
    """What the host knows about one graph before running it."""

    label: str
    path: Path
    files: tuple[Path, ...]  # the .onnx file and its external-data files
    file_size_bytes: int
    inputs: tuple[InputSpec, ...]
    op_counts: dict[str, int]

    @property
    def matmul_quantized_nodes(self) -> int:
        return sum(n for op, n in self.op_counts.items() if op in QUANTIZED_MATMULS)

    @property
    def matmul_fp32_nodes(self) -> int:
        return sum(n for op, n in self.op_counts.items() if op in FP_MATMULS)


def resolve_graphs(paths: Sequence[Path | str]) -> list[Path]:
    """Expand folders to their ``*.onnx`` files (sorted) and check that every file exists.

    Raises:
        TargetNotFoundError: a path does not exist, or a folder holds no ``.onnx`` file.

    Example:
        >>> resolve_graphs([])
        Traceback (most recent call last):
        ...
        edgefuse.errors.TargetNotFoundError: no graph given: pass one or more .onnx files or folders
    """
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(p.glob("*.onnx"))
            if not found:
                raise TargetNotFoundError(f"folder {str(p)!r} holds no .onnx file; pass graphs or a folder of them")
            out.extend(found)
        elif p.is_file():
            out.append(p)
        else:
            raise TargetNotFoundError(f"graph {str(p)!r} does not exist; pass an existing .onnx file or folder")
    if not out:
        raise TargetNotFoundError("no graph given: pass one or more .onnx files or folders")
    return out


def unique_labels(paths: Sequence[Path]) -> list[str]:
    """Short readable labels: the file stem, prefixed by its folder where stems repeat (a/model, b/model)."""
    stems = [p.stem for p in paths]
    labels = [f"{p.parent.name}/{p.stem}" if stems.count(p.stem) > 1 else p.stem for p in paths]
    seen: Counter[str] = Counter()
    out = []
    for lab in labels:
        seen[lab] += 1
        out.append(lab if seen[lab] == 1 else f"{lab}#{seen[lab]}")
    return out


def inspect_graph(path: Path, label: str) -> GraphInfo:
    """Read inputs, op counts and external-data files of a graph (weights are not loaded).

    Raises:
        TargetNotFoundError: the file is not a readable ONNX model.
    """
    from edgefuse.ort import load_graph

    model = load_graph(path)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    extra_files = sorted(
        {e.value for t in graph.initializer for e in t.external_data if e.key == "location"}
    )
    files = (path, *(path.parent / f for f in extra_files))
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise DataError(f"graph {str(path)!r} refers to external data files that are missing: {missing}")
    producers = {out: node for node in graph.node for out in node.output}
    op_counts = Counter(n.op_type for n in graph.node)
    init_names = set(inits)
    specs = []
    for inp in graph.input:
        if inp.name in init_names:
            continue
        tt = inp.type.tensor_type
        dims: list[int | str] = []
        for i, d in enumerate(tt.shape.dim):
            if d.HasField("dim_value") and d.dim_value > 0:
                dims.append(int(d.dim_value))
            else:
                dims.append("batch" if i == 0 else "sequence")
        specs.append(InputSpec(inp.name, tt.elem_type, tuple(dims), _vocab_bound(graph, inp.name, inits, producers)))
    return GraphInfo(label, path, files, sum(f.stat().st_size for f in files), tuple(specs), dict(op_counts))


def _vocab_bound(graph, name: str, inits: dict, producers: dict) -> int | None:
    """Rows of the embedding table that ``name`` indexes (Gather data, possibly behind a DequantizeLinear)."""
    for node in graph.node:
        if node.op_type != "Gather" or len(node.input) < 2 or node.input[1] != name:
            continue
        data = node.input[0]
        src = producers.get(data)
        if data not in inits and src is not None and src.op_type == "DequantizeLinear":
            data = src.input[0]
        if data in inits and len(inits[data].dims) >= 1:
            return int(inits[data].dims[0])
    return None


TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer.model", "vocab.json", "merges.txt")


def shared_tokenizer_folder(infos: Sequence[GraphInfo]) -> Path | None:
    """The folder of the first graph when every graph's folder holds the same tokenizer files, else None."""
    import hashlib

    def fingerprint(folder: Path) -> str | None:
        files = [folder / f for f in TOKENIZER_FILES if (folder / f).is_file()]
        if not files:
            return None
        return hashlib.sha256(b"".join(f.name.encode() + f.read_bytes() for f in files)).hexdigest()

    prints = {fingerprint(info.path.parent) for info in infos}
    return infos[0].path.parent if len(prints) == 1 and None not in prints else None


def real_text_feeds(
    infos: Sequence[GraphInfo], shapes: Sequence[tuple[int, int]]
) -> dict[tuple[int, int], dict[str, np.ndarray]]:
    """Token ids of real sentences (the built-in corpus, :func:`edgefuse.records.builtin_texts`, tokenized by
    the graphs' shared tokenizer), per shape.

    Random ids say little about a compressed model (a fused, recovered graph agrees with its teacher far
    better on text than on noise), so the output check runs on text whenever the graphs' folders share a
    tokenizer. Empty when they do not (then the random ids of :func:`make_feeds` are used).
    """
    folder = shared_tokenizer_folder(infos)
    if folder is None:
        return {}
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(folder)
    except Exception as exc:  # a tokenizer transformers cannot read: random ids, said in the log
        logging.getLogger(__name__).info("output check on random token ids: tokenizer of %s unreadable (%s)",
                                         folder, type(exc).__name__)
        return {}
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    from edgefuse.records import builtin_texts

    lines = builtin_texts()
    feeds: dict[tuple[int, int], dict[str, np.ndarray]] = {}
    for b, s in shapes:
        enc = tok([lines[i % len(lines)] for i in range(b)], padding="max_length", truncation=True, max_length=s,
                  return_tensors="np")
        feeds[(b, s)] = {k: np.asarray(v) for k, v in enc.items()}
    return feeds


def make_feeds(
    infos: Sequence[GraphInfo],
    shapes: Sequence[tuple[int, int]],
    out: Path,
    *,
    seed: int = 0,
    inputs_npz: Path | None = None,
    text: dict[tuple[int, int], dict[str, np.ndarray]] | None = None,
) -> list[tuple[int, int]]:
    """Write every graph's feeds for every (batch, seq) shape into ``out`` (keys ``"{graph}|{b}x{s}|{input}"``).

    Token ids are drawn once per (shape, input name) below the smallest embedding table of all graphs, so all
    graphs see the same tokens. Masks are ones, token types zeros, position ids ``arange``. ``text`` (from
    :func:`real_text_feeds`) replaces the ids, mask and token types of a shape with tokenized sentences.

    Returns:
        The shapes actually used (the shape of ``inputs_npz`` when given).

    Raises:
        ConfigError: a graph has a fixed input dimension that disagrees with the requested shape.
        DataError: ``inputs_npz`` lacks an input a graph needs.
    """
    arrays: dict[str, np.ndarray] = {}
    if inputs_npz is not None:
        given = _read_inputs(Path(inputs_npz))
        b, s = next(iter(given.values())).shape[:2]
        shapes = [(int(b), int(s))]
        for gi, info in enumerate(infos):
            for spec in info.inputs:
                if spec.name not in given:
                    raise DataError(f"{str(inputs_npz)!r} has no array {spec.name!r} needed by graph {info.label!r} "
                                    f"(it has {sorted(given)})")
                arrays[f"{gi}|{b}x{s}|{spec.name}"] = given[spec.name].astype(_NP_TYPES.get(spec.elem_type, np.float32))
        np.savez(out, **arrays)  # type: ignore[arg-type]  # numpy's stub reads **kw as allow_pickle
        return shapes
    highs: dict[str, int] = {}
    for info in infos:
        for spec in info.inputs:
            if spec.int_high is not None:
                highs[spec.name] = min(highs.get(spec.name, spec.int_high), spec.int_high)
    for b, s in shapes:
        shared: dict[str, np.ndarray] = {}
        for gi, info in enumerate(infos):
            for spec in info.inputs:
                shape = tuple(b if d == "batch" else s if d == "sequence" else int(d) for d in spec.dims)
                fixed = [d for d, want in zip(spec.dims, (b, s), strict=False) if isinstance(d, int) and d != want]
                if fixed:
                    raise ConfigError(
                        f"graph {info.label!r} input {spec.name!r} has fixed shape {list(spec.dims)}, which cannot run "
                        f"at batch={b}, seq={s}; pass --batch-sizes/--seq-lens matching it or export with dynamic axes"
                    )
                key = f"{spec.name}|{shape}|{spec.elem_type}"
                given = (text or {}).get((b, s), {}).get(spec.name)
                if key not in shared and given is not None and given.shape == shape:
                    shared[key] = given.astype(_NP_TYPES.get(spec.elem_type, np.int64))
                if key not in shared:
                    shared[key] = _make_array(spec, shape, highs.get(spec.name), seed)
                arrays[f"{gi}|{b}x{s}|{spec.name}"] = shared[key]
    np.savez(out, **arrays)  # type: ignore[arg-type]
    return list(shapes)


def _make_array(spec: InputSpec, shape: tuple[int, ...], high: int | None, seed: int) -> np.ndarray:
    dtype = _NP_TYPES.get(spec.elem_type)
    if dtype is None:
        raise ConfigError(f"input {spec.name!r} has ONNX element type {spec.elem_type}, which the profiler cannot "
                          f"fill; pass real inputs with --inputs-npz")
    # A stable per-input seed (crc32, not hash(): that is salted per process).
    rng = np.random.default_rng([seed, zlib.crc32(spec.name.encode())])
    lname = spec.name.lower()
    if np.issubdtype(dtype, np.floating):
        return rng.standard_normal(shape).astype(dtype)
    if dtype is np.bool_ or "mask" in lname:
        return np.ones(shape, dtype=dtype)
    if "token_type" in lname or "segment" in lname:
        return np.zeros(shape, dtype=dtype)
    if "position" in lname:
        return np.broadcast_to(np.arange(shape[-1], dtype=dtype), shape).copy()
    # Unknown table size: stay at 0/1, always valid ids; token-like inputs start above the special tokens.
    if high is None:
        return rng.integers(0, 2, size=shape).astype(dtype)
    low = min(3, high - 1)
    return rng.integers(low, high, size=shape).astype(dtype)


def _read_inputs(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise TargetNotFoundError(f"inputs file {str(path)!r} does not exist")
    try:
        with np.load(path, allow_pickle=False) as npz:
            given = {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as exc:
        raise DataError(f"{str(path)!r} is not a readable .npz ({exc})") from exc
    if not given or any(a.ndim < 2 for a in given.values()):
        raise DataError(f"{str(path)!r} must hold arrays of shape (batch, seq, ...), got "
                        f"{ {k: a.shape for k, a in given.items()} }")
    return given


def write_prefill_inputs(graph: Path, batch: int, seq: int, seed: int, out: Path) -> bool:
    """Inputs of a KV-cache graph for one prefill step: ``seq`` prompt tokens and zero-length past tensors.

    Returns False, writing nothing, for a graph without ``past_key_values.*`` inputs."""
    import numpy as np
    import onnx

    from edgefuse.ort import PAST_PREFIX

    model = onnx.load(str(graph), load_external_data=False)
    if not any(i.name.startswith(PAST_PREFIX) for i in model.graph.input):
        return False
    config = graph.parent / "config.json"
    vocab = int(json.loads(config.read_text()).get("vocab_size", 100)) if config.is_file() else 100
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {"input_ids": rng.integers(min(3, vocab - 1), vocab, (batch, seq), dtype=np.int64)}
    for inp in model.graph.input:
        dims = [d.dim_value if d.HasField("dim_value") else None for d in inp.type.tensor_type.shape.dim]
        if inp.name == "attention_mask":
            arrays[inp.name] = np.ones((batch, seq), dtype=np.int64)
        elif inp.name == "position_ids":
            arrays[inp.name] = np.broadcast_to(np.arange(seq, dtype=np.int64), (batch, seq)).copy()
        elif inp.name.startswith(PAST_PREFIX):  # (batch, kv_heads, past_len = 0, head_dim)
            arrays[inp.name] = np.zeros((batch, dims[1] or 1, 0, dims[3] or 1), dtype=np.float32)
    np.savez(out, **arrays)  # type: ignore[arg-type]
    return True
