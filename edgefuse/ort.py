"""ONNX Runtime helpers shared by export validation and quantization checks: sessions, feeds, greedy decoding.

Everything here works from the graph's own input names and shapes, so the same code runs optimum's exports
(``past_key_values.N.key``, ``position_ids``...) and edgefuse's torch exports.

Example:
    >>> import numpy as np
    >>> ids, mask = random_batch(vocab_size=50, batch=2, seq=6, seed=0)
    >>> ids.shape, int(mask[1].sum()) < 6
    ((2, 6), True)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgefuse import metrics

PAST_PREFIX = "past_key_values."


def make_session(path: Path, *, threads: int = 2, optimize: bool = True, options: dict[str, Any] | None = None) -> Any:
    """A CPU ``InferenceSession`` with a fixed thread count (no spinning, so a shared CI box stays usable).

    ``options`` are the session options ``edgefuse tune`` records (``disabled_optimizers``, ``allow_spinning``,
    ``intra_op_threads``, ``session_config``); they override the defaults.
    """
    import onnxruntime as ort

    own = options or {}
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(own.get("intra_op_threads") or threads)
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if own.get("allow_spinning") else "0")
    for key, value in (own.get("session_config") or {}).items():
        opts.add_session_config_entry(str(key), str(value))
    opts.log_severity_level = 4  # errors surface as exceptions; no console noise
    opts.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    disabled = [str(d) for d in own.get("disabled_optimizers") or ()]
    extra = {"disabled_optimizers": disabled} if disabled else {}
    check_graph_file(path)
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"], **extra)
    except Exception as exc:  # onnxruntime raises its own classes (InvalidProtobuf, Fail, InvalidGraph...)
        from edgefuse.errors import TargetNotFoundError

        first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise TargetNotFoundError(
            f"{str(path)!r} is not a loadable ONNX graph ({first}); re-export it with `edgefuse export`"
        ) from None


def check_graph_file(path: Path) -> None:
    """Refuse a missing, empty or non-protobuf (text) ``.onnx`` file with one line, before a library sees it.

    Raises:
        TargetNotFoundError: the file is missing, empty, or plain text.
    """
    from edgefuse.errors import TargetNotFoundError

    path = Path(path)
    if not path.is_file():
        raise TargetNotFoundError(f"ONNX graph {str(path)!r} does not exist")
    with open(path, "rb") as fh:
        head = fh.read(64)
    if not head:
        raise TargetNotFoundError(f"ONNX graph {str(path)!r} is empty (0 bytes; an interrupted copy?); re-export it")
    if head.lstrip()[:1] in (b"{", b"<", b"#") or head.startswith(b"ir_version"):
        raise TargetNotFoundError(f"{str(path)!r} is text, not a binary ONNX graph; re-export it")


def load_graph(path: Path, *, load_external_data: bool = False) -> Any:
    """``onnx.load`` with one-line errors: a corrupt, empty, truncated or text file is refused.

    Raises:
        TargetNotFoundError: the file is not a valid ONNX model (no graph, or it does not parse).
    """
    import onnx

    from edgefuse.errors import TargetNotFoundError

    check_graph_file(path)
    try:
        model = onnx.load(str(path), load_external_data=load_external_data)
    except Exception as exc:  # protobuf's DecodeError and friends: the file is damaged
        raise TargetNotFoundError(
            f"{str(path)!r} is not a valid ONNX graph ({type(exc).__name__}: {str(exc)[:120]}); truncated or "
            "damaged? re-export it"
        ) from None
    if not model.graph.node or not model.ir_version:
        raise TargetNotFoundError(f"{str(path)!r} holds no ONNX graph (truncated or damaged?); re-export it")
    return model


def session(folder: Path, *, threads: int | None = None) -> Any:
    """The graph an export folder recommends, opened as recommended: the graph ``edgefuse tune`` chose, with the
    session options it was timed with (checked against the manifest's sha256), else the fp32 ``model.onnx``.
    ``threads`` None: the thread count it was tuned at (1 for an untuned folder).

    Example:
        >>> s = session("out/minilm-onnx")  # doctest: +SKIP
        >>> [i.name for i in s.get_inputs()]  # doctest: +SKIP
        ['input_ids', 'attention_mask', 'token_type_ids']
    """
    from edgefuse.manifest import read_manifest, verify_graph

    folder = Path(folder)
    manifest = read_manifest(folder)
    tuned = manifest.get("tuned") or {}
    name = tuned.get("graph", "model.onnx")
    verify_graph(folder, name, manifest)
    return make_session(folder / name, threads=threads or int(tuned.get("threads") or 1),
                        options=tuned.get("session_options"))


def random_batch(
    vocab_size: int, batch: int, seq: int, seed: int, *, left_pad: bool = False, low: int = 3
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded token ids and an attention mask; row ``i >= 1`` has ``i * seq // (2 * batch)`` padded positions
    (at least one), on the right for encoders and on the left for decoders."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(min(low, vocab_size - 1), vocab_size, size=(batch, seq), dtype=np.int64)
    mask = np.ones((batch, seq), dtype=np.int64)
    for i in range(1, batch):
        pad = max(1, min(seq - 1, i * seq // (2 * batch)))
        if left_pad:
            mask[i, :pad] = 0
        else:
            mask[i, seq - pad :] = 0
    return ids, mask


def tokenize(
    tokenizer: Any, texts: Sequence[str], max_length: int, *, left_pad: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Tokenize ``texts`` into padded int64 arrays (padding side chosen by the caller, restored after)."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left" if left_pad else "right"
    try:
        enc = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="np")
    finally:
        tokenizer.padding_side = side
    return enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)


def position_ids_from_mask(mask: np.ndarray, past_len: int = 0) -> np.ndarray:
    """Positions as transformers (and optimum's ORTModelForCausalLM) derive them: cumsum of the mask, padded -> 1."""
    pos = np.cumsum(mask, axis=-1) - 1
    pos = np.where(mask == 0, 1, pos)
    return pos[:, past_len:].astype(np.int64)


def past_inputs(session: Any) -> list[Any]:
    """The ``past_key_values.*`` inputs of a KV-cache graph, in order (empty for graphs without past)."""
    return [i for i in session.get_inputs() if i.name.startswith(PAST_PREFIX)]


def empty_past(session: Any, batch: int) -> dict[str, np.ndarray]:
    """Zero-length past tensors (``[batch, kv_heads, 0, head_dim]``) for the first forward of a KV-cache graph."""
    feed = {}
    for inp in past_inputs(session):
        dims = [d if isinstance(d, int) else 0 for d in inp.shape]
        dims[0] = batch
        feed[inp.name] = np.zeros(dims, dtype=np.float32)
    return feed


def build_feed(
    session: Any,
    ids: np.ndarray,
    mask: np.ndarray,
    *,
    past: dict[str, np.ndarray] | None = None,
    full_mask: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """The input dict of ``session`` for these tokens (``full_mask`` covers past + new tokens when given)."""
    names = {i.name for i in session.get_inputs()}
    total_mask = mask if full_mask is None else full_mask
    past_len = total_mask.shape[1] - ids.shape[1]
    feed: dict[str, np.ndarray] = {"input_ids": ids}
    if "attention_mask" in names:
        feed["attention_mask"] = total_mask
    if "token_type_ids" in names:
        feed["token_type_ids"] = np.zeros_like(ids)
    if "position_ids" in names:
        feed["position_ids"] = position_ids_from_mask(total_mask, past_len)
    if "decoder_input_ids" in names:  # encoder-decoder feature extraction: a short decoder prefix
        feed["decoder_input_ids"] = ids[:, : min(4, ids.shape[1])]
    if past_inputs(session):
        feed.update(past if past is not None else empty_past(session, ids.shape[0]))
    return feed


def task_vectors(session: Any, task: str, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """One row per sample (feature-extraction: mean-pooled embedding; classification: logits) or per real
    token (causal-lm: next-token logits), for comparing a quantized graph with fp32."""
    out = session.run(None, build_feed(session, ids, mask))[0]
    return metrics.task_vectors(task, out, mask)


def onnx_vectors(session: Any, task: str, batch: metrics.EvalBatch) -> np.ndarray:
    """Task vectors of an onnxruntime session on ``batch`` (feeds built from the graph's own input names)."""
    feed = build_feed(session, batch.input_ids, batch.attention_mask)
    if batch.token_type_ids is not None and "token_type_ids" in feed:
        feed["token_type_ids"] = batch.token_type_ids
    first = session.run(None, feed)[0]
    return metrics.task_vectors(task, first, batch.attention_mask)


def greedy_generate(
    session: Any,
    ids: np.ndarray,
    mask: np.ndarray,
    n_tokens: int,
    *,
    suppress: Sequence[int] = (),
    stop: Sequence[int] = (),
    step_ms: list[float] | None = None,
    step_cpu_ms: list[float] | None = None,
) -> np.ndarray:
    """Greedy decoding through a graph: with the KV cache when the graph has past inputs, else by re-running
    the whole sequence. ``suppress`` ids (EOS, as ``min_new_tokens`` does) are never chosen. With ``stop`` ids
    (EOS), decoding ends early once every row has produced one (rows that stopped earlier go on being decoded
    and are cut by the caller). ``step_ms`` gets the wall time of every step (the first is the prefill, each
later one a decode step: session run, argmax and feed); ``step_cpu_ms`` gets the CPU time of the same steps (this
process, all threads). Returns the new tokens ``[batch, <= n_tokens]``."""
    import time

    output_names = [o.name for o in session.get_outputs()]
    has_past = bool(past_inputs(session))
    cur_ids, cur_mask, past = ids, mask, None
    all_ids, new = ids, []
    done = np.zeros(ids.shape[0], dtype=bool)
    for _ in range(n_tokens):
        t0, c0 = time.perf_counter(), time.process_time()
        feed = build_feed(session, cur_ids, cur_mask if not has_past else cur_mask[:, -cur_ids.shape[1] :],
                          past=past, full_mask=cur_mask)
        outs = dict(zip(output_names, session.run(None, feed), strict=True))
        logits = outs["logits"][:, -1, :].astype(np.float64)
        if suppress:
            logits[:, list(suppress)] = -np.inf
        nxt = logits.argmax(axis=-1).astype(np.int64)[:, None]
        new.append(nxt)
        if step_ms is not None:
            step_ms.append((time.perf_counter() - t0) * 1e3)
        if step_cpu_ms is not None:
            step_cpu_ms.append((time.process_time() - c0) * 1e3)
        if stop:
            done |= np.isin(nxt[:, 0], list(stop))
            if done.all():
                break
        cur_mask = np.concatenate([cur_mask, np.ones_like(nxt)], axis=1)
        all_ids = np.concatenate([all_ids, nxt], axis=1)
        if has_past:
            past = {n.replace("present.", PAST_PREFIX): v for n, v in outs.items() if n.startswith("present.")}
            cur_ids = nxt
        else:
            cur_ids = all_ids
    return np.concatenate(new, axis=1)
