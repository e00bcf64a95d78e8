"""Llama-type attention with a KV cache -> onnxruntime's ``GroupQueryAttention`` (com.microsoft), one node a layer.

The exported attention of a Llama-type decoder (Llama, Mistral, Qwen2, SmolLM2) is about a hundred small nodes a
layer: reshapes, rotary embedding, the causal and padding masks built from shapes, the KV-cache concatenation,
two MatMuls and a Softmax. At batch 1 and one new token each does almost no arithmetic, so their count sets the
decode time. onnxruntime's transformer optimizer does not fuse this form of the graph; this pass does, the way
onnxruntime-genai's model builder writes it: the q/k/v projections feed one ``GroupQueryAttention`` node that
applies the rotary embedding (``cos_cache``/``sin_cache``, from ``rope_theta``), appends to the cache and attends.
The q, k and v projections are packed into one MatMul (one kernel instead of three at every step), as the model
builder does.

Padding: edgefuse's decoders are left-padded (``attention_mask`` has zeros before the text). Every row counts as
full length, and an additive ``attention_bias`` built from ``attention_mask`` (the dtype's lowest value at padded
keys, as transformers does) masks the padding. The fused node rotates at absolute positions (0, 1, ... including
the padding), where the exported graph rotates at ``position_ids`` (counting real tokens only). Rotary attention
depends only on the distance between positions, so every logit is the same; but the cached keys of a padded row
differ, and a cache must be fed back to the graph that wrote it. The graph keeps its ``position_ids`` input,
unused. The optimize stage checks the logits on padded batches and three decoding steps in which each graph
carries its own cache.

Not applied (the pass leaves the graph unchanged and says why): a head size that is not a multiple of 16,
rotary scaling (``rope_scaling``), sliding-window attention, a layer whose q/k/v/o projections or cache tensors are
not found by their export names, models that are not Llama-type.

Example:
    >>> import onnx
    >>> fuse_group_query_attention(onnx.ModelProto(), {"model_type": "bert"}).reason
    "model_type 'bert' is not a Llama-type decoder (llama, mistral, qwen2)"
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

LLAMA_TYPES = ("llama", "mistral", "qwen2")
MS_DOMAIN = "com.microsoft"


@dataclass(frozen=True)
class GqaResult:
    """What the pass did: ``layers`` fused (0 when not applied) and, when not applied, the ``reason``;
    ``packed_qkv``: the layers whose q/k/v projections became one MatMul."""

    layers: int
    reason: str | None = None
    packed_qkv: int = 0


def _rope_caches(config: dict[str, Any], head_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """``cos``/``sin`` ``[max_positions, head_dim / 2]`` computed as transformers computes them (float32)."""
    import torch

    theta = float(config.get("rope_theta", 10000.0))
    positions = int(config.get("max_position_embeddings", 2048))
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs = torch.outer(torch.arange(positions, dtype=torch.int64).float(), inv_freq)
    return freqs.cos().numpy(), freqs.sin().numpy()


def _not_applicable(config: dict[str, Any]) -> str | None:
    model_type = config.get("model_type")
    if model_type not in LLAMA_TYPES:
        return f"model_type {model_type!r} is not a Llama-type decoder ({', '.join(LLAMA_TYPES)})"
    if config.get("rope_scaling"):
        return f"rope_scaling {config['rope_scaling']!r} is not reproduced by the fused node"
    if config.get("sliding_window") and config.get("use_sliding_window", model_type == "mistral"):
        return f"sliding-window attention (sliding_window {config['sliding_window']}) is not supported"
    return None


def _projection_nodes(nodes: dict[str, Any], consumers: dict[str, list[Any]], layer: int,
                      name: str) -> tuple[Any, Any]:
    """The MatMul of ``self_attn/<name>_proj`` of ``layer`` (None when absent) and the bias Add after it
    (Qwen2; None without one)."""
    node = nodes.get(f"/model/layers.{layer}/self_attn/{name}_proj/MatMul")
    if node is None:
        return None, None
    after = consumers.get(node.output[0], [])
    if len(after) == 1 and after[0].op_type == "Add" and after[0].name.startswith(
            f"/model/layers.{layer}/self_attn/{name}_proj/"):
        return node, after[0]
    return node, None


def _projection(nodes: dict[str, Any], consumers: dict[str, list[Any]], layer: int, name: str) -> str | None:
    """The output of ``self_attn/<name>_proj`` of ``layer``: its MatMul, or the bias Add after it (Qwen2)."""
    node, add = _projection_nodes(nodes, consumers, layer, name)
    return None if node is None else (add or node).output[0]


def _pack_qkv(layer: int, nodes: dict[str, Any], consumers: dict[str, list[Any]],
              inits: dict[str, Any]) -> tuple[list[Any], list[Any], str] | None:
    """One MatMul (and bias Add) for the q, k and v projections of ``layer``, as onnxruntime-genai writes them:
    the new nodes, the new initializers and the packed output; None when the three do not share their input or
    their weights (and biases) are not constants."""
    from onnx import helper, numpy_helper

    base = f"/model/layers.{layer}/self_attn"
    found = [_projection_nodes(nodes, consumers, layer, n) for n in "qkv"]
    mms = [m for m, _ in found]
    if any(m is None for m in mms) or len({m.input[0] for m in mms}) != 1:
        return None
    if not all(m.input[1] in inits for m in mms):
        return None
    adds = []
    for m, add in found:
        if add is not None:
            other = [i for i in add.input if i != m.output[0]]
            if len(other) != 1 or other[0] not in inits:
                return None
            adds.append(other[0])
    if adds and len(adds) != 3:
        return None
    weight = np.concatenate([numpy_helper.to_array(inits[m.input[1]]) for m in mms], axis=1)
    w_name, out = f"model.layers.{layer}.self_attn.qkv_proj.weight", f"{base}/qkv_proj/MatMul_output_0"
    new_inits = [numpy_helper.from_array(weight, w_name)]
    new_nodes = [helper.make_node("MatMul", [mms[0].input[0], w_name], [out], name=f"{base}/qkv_proj/MatMul")]
    if adds:
        bias = np.concatenate([numpy_helper.to_array(inits[b]) for b in adds])
        b_name = f"model.layers.{layer}.self_attn.qkv_proj.bias"
        new_inits.append(numpy_helper.from_array(bias, b_name))
        new_nodes.append(helper.make_node("Add", [out, b_name], [f"{base}/qkv_proj/Add_output_0"],
                                          name=f"{base}/qkv_proj/Add"))
        out = f"{base}/qkv_proj/Add_output_0"
    return new_nodes, new_inits, out


def _prune(graph: Any) -> None:
    """Drop every node and initializer no graph output depends on."""
    needed = {o.name for o in graph.output}
    keep = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
            for attr in node.attribute:  # subgraphs (If/Loop) read outer names
                for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    needed.update(i for n in sub.node for i in n.input if i)
    del graph.node[:]
    graph.node.extend(reversed(keep))
    inits = [i for i in graph.initializer if i.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(inits)


def fuse_group_query_attention(model: Any, config: dict[str, Any], *, pack_qkv: bool = True) -> GqaResult:
    """Replace the attention of every layer of an exported Llama-type decoder with KV cache by one
    ``GroupQueryAttention`` node, in place.

    Args:
        model: the ``onnx.ModelProto`` of an edgefuse export (``text-generation-with-past``).
        config: the export folder's ``config.json``.
        pack_qkv: also merge each layer's q, k and v projections into one MatMul (and one bias Add), as
            onnxruntime-genai's model builder does, where their weights are constants sharing one input.

    Returns:
        A :class:`GqaResult`; ``layers`` 0 and a ``reason`` when the graph is left as it was.
    """
    from onnx import TensorProto, helper, numpy_helper

    reason = _not_applicable(config)
    if reason:
        return GqaResult(0, reason)
    graph = model.graph
    inputs = {i.name for i in graph.input}
    outputs = {o.name for o in graph.output}
    n_layers = int(config.get("num_hidden_layers", 0))
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or config["hidden_size"] // heads)
    if head_dim % 16:  # onnxruntime's CPU kernel: "head_size shall be a multiple of 16"
        return GqaResult(0, f"head_dim {head_dim} is not a multiple of 16 (onnxruntime's kernel needs it)")
    for name in ("input_ids", "attention_mask", "position_ids"):
        if name not in inputs:
            return GqaResult(0, f"the graph has no {name!r} input")
    nodes = {n.name: n for n in graph.node}
    consumers: dict[str, list[Any]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    plan = []
    for layer in range(n_layers):
        q, k, v = (_projection(nodes, consumers, layer, p) for p in "qkv")
        o_node = nodes.get(f"/model/layers.{layer}/self_attn/o_proj/MatMul")
        cache = [f"past_key_values.{layer}.key", f"past_key_values.{layer}.value"]
        present = [f"present.{layer}.key", f"present.{layer}.value"]
        if None in (q, k, v) or o_node is None:
            return GqaResult(0, f"layer {layer}: the q/k/v/o projections were not found by their export names")
        if not all(c in inputs for c in cache) or not all(p in outputs for p in present):
            return GqaResult(0, f"layer {layer}: no KV cache inputs/outputs (export with with_past: true)")
        plan.append((layer, q, k, v, o_node, cache, present))
    if not plan:
        return GqaResult(0, "no decoder layer found (num_hidden_layers is 0 or missing)")

    p = "/edgefuse_gqa/"
    cos, sin = _rope_caches(config, head_dim)
    lowest = float(np.finfo(np.float32).min)
    consts = {
        f"{p}cos_cache": cos, f"{p}sin_cache": sin,
        f"{p}one": np.array(1, dtype=np.int64), f"{p}axes1": np.array([1], dtype=np.int64),
        f"{p}axes12": np.array([1, 2], dtype=np.int64), f"{p}idx0": np.array(0, dtype=np.int64),
        f"{p}idx1": np.array(1, dtype=np.int64), f"{p}zero_f": np.array(0.0, dtype=np.float32),
        f"{p}lowest": np.array(lowest, dtype=np.float32), f"{p}zero_i": np.array(0, dtype=np.int64),
    }
    graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in consts.items())
    mk = helper.make_node
    shared = [
        # total_sequence_length: the attention mask's width (past + new tokens), a scalar int32
        mk("Shape", ["attention_mask"], [f"{p}mask_shape"], name=f"{p}Shape"),
        mk("Gather", [f"{p}mask_shape", f"{p}idx1"], [f"{p}total_len64"], name=f"{p}Gather_total", axis=0),
        mk("Cast", [f"{p}total_len64"], [f"{p}total_len"], name=f"{p}Cast_total", to=TensorProto.INT32),
        # seqlens_k: every row is full length (left padding is masked by attention_bias instead)
        mk("Shape", ["input_ids"], [f"{p}ids_shape"], name=f"{p}Shape_ids"),
        mk("Gather", [f"{p}ids_shape", f"{p}idx0"], [f"{p}batch"], name=f"{p}Gather_batch", axis=0),
        mk("Gather", [f"{p}ids_shape", f"{p}idx1"], [f"{p}seq"], name=f"{p}Gather_seq", axis=0),
        mk("Sub", [f"{p}total_len64", f"{p}one"], [f"{p}last64"], name=f"{p}Sub_last"),
        mk("Unsqueeze", [f"{p}batch", f"{p}zero_i"], [f"{p}batch_1d"], name=f"{p}Unsqueeze_batch"),
        mk("Expand", [f"{p}last64", f"{p}batch_1d"], [f"{p}seqlens64"], name=f"{p}Expand_seqlens"),
        mk("Cast", [f"{p}seqlens64"], [f"{p}seqlens_k"], name=f"{p}Cast_seqlens", to=TensorProto.INT32),
        # attention_bias [batch, 1, seq, total]: 0 at real keys, the lowest float at padded keys
        mk("Equal", ["attention_mask", f"{p}zero_i"], [f"{p}is_pad"], name=f"{p}Equal_pad"),
        mk("Where", [f"{p}is_pad", f"{p}lowest", f"{p}zero_f"], [f"{p}bias2d"], name=f"{p}Where_bias"),
        mk("Unsqueeze", [f"{p}bias2d", f"{p}axes12"], [f"{p}bias4d"], name=f"{p}Unsqueeze_bias"),
        mk("Unsqueeze", [f"{p}seq", f"{p}zero_i"], [f"{p}seq_1d"], name=f"{p}Unsqueeze_seq"),
        mk("Unsqueeze", [f"{p}total_len64", f"{p}zero_i"], [f"{p}total_1d"], name=f"{p}Unsqueeze_total"),
        mk("Concat", [f"{p}batch_1d", f"{p}axes1", f"{p}seq_1d", f"{p}total_1d"], [f"{p}bias_shape"],
           name=f"{p}Concat_bias_shape", axis=0),
        mk("Expand", [f"{p}bias4d", f"{p}bias_shape"], [f"{p}attention_bias"], name=f"{p}Expand_bias"),
    ]
    fused: list[list[Any]] = []
    replaced = set()
    inits = {i.name: i for i in graph.initializer}
    packed = 0
    for layer, q, k, v, o_node, cache, present in plan:
        out = f"/model/layers.{layer}/self_attn/GroupQueryAttention_output_0"
        pack = _pack_qkv(layer, nodes, consumers, inits) if pack_qkv else None
        group: list[Any] = []
        if pack is not None:  # one MatMul for q, k and v: fewer, larger kernels at decode
            group, new_inits, qkv = pack
            graph.initializer.extend(new_inits)
            q, k, v = qkv, "", ""
            packed += 1
        group.append(mk(
            "GroupQueryAttention",
            [q, k, v, *cache, f"{p}seqlens_k", f"{p}total_len", f"{p}cos_cache", f"{p}sin_cache", "",
             f"{p}attention_bias"],
            [out, *present], name=f"/model/layers.{layer}/self_attn/GroupQueryAttention", domain=MS_DOMAIN,
            num_heads=heads, kv_num_heads=kv_heads, scale=1.0 / math.sqrt(head_dim), do_rotary=1,
            rotary_interleaved=0, local_window_size=-1))
        fused.append(group)
        o_node.input[0] = out
        replaced.update(present)
    # the old producers of the cache outputs go; everything else that only fed them is pruned below
    kept = [n for n in graph.node if not replaced.intersection(n.output)]
    del graph.node[:]
    graph.node.extend(shared + kept)
    # each layer's new nodes (packed projection, GroupQueryAttention) right before their consumer, o_proj
    for group in fused:
        out = group[-1].output[0]
        idx = next(i for i, n in enumerate(graph.node) if out in n.input)
        for j, node in enumerate(group):  # protobuf lists take no slice assignment
            graph.node.insert(idx + j, node)
    _prune(graph)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return GqaResult(len(plan), packed_qkv=packed)
