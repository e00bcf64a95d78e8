"""Tiny random transformers models for every supported architecture, built in-process from configs (no network).

Example:
    >>> m = tiny_model("bert")
    >>> m.config.model_type
    'bert'
"""

from __future__ import annotations

from typing import Any

import torch

VOCAB = 64
ARCHS = ("bert", "roberta", "gpt2", "llama", "mistral", "qwen2", "mixtral", "qwen2_moe", "switch_transformers")


def tiny_config(arch: str) -> Any:
    """The config of a tiny model (hidden 16, intermediate 32, 2-3 layers)."""
    import transformers as t

    common_dec = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)
    if arch in ("bert", "roberta"):
        cls = t.BertConfig if arch == "bert" else t.RobertaConfig
        return cls(hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32,
                   vocab_size=VOCAB, max_position_embeddings=64, hidden_dropout_prob=0.0,
                   attention_probs_dropout_prob=0.0, pad_token_id=1 if arch == "roberta" else 0)
    if arch == "gpt2":
        return t.GPT2Config(n_embd=16, n_layer=3, n_head=2, vocab_size=VOCAB, n_positions=64,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    if arch == "llama":
        return t.LlamaConfig(**common_dec)
    if arch == "mistral":
        return t.MistralConfig(**common_dec)
    if arch == "qwen2":
        return t.Qwen2Config(**common_dec)
    if arch == "mixtral":
        return t.MixtralConfig(**common_dec, num_local_experts=4, num_experts_per_tok=2)
    if arch == "qwen2_moe":
        return t.Qwen2MoeConfig(**common_dec, moe_intermediate_size=24, shared_expert_intermediate_size=32,
                                num_experts=4, num_experts_per_tok=2)
    if arch == "switch_transformers":
        return t.SwitchTransformersConfig(d_model=16, d_ff=32, d_kv=8, num_layers=2, num_decoder_layers=2,
                                          num_heads=2, num_experts=4, vocab_size=VOCAB, dropout_rate=0.0,
                                          num_sparse_encoder_layers=1, num_sparse_decoder_layers=1)
    raise KeyError(arch)


def tiny_model(arch: str, *, seed: int = 0, head: str = "base") -> Any:
    """A seeded tiny model in eval mode. ``head``: base | lm | cls (classification, 2 labels)."""
    import transformers as t

    torch.manual_seed(seed)
    config = tiny_config(arch)
    if arch == "switch_transformers":
        model = t.SwitchTransformersForConditionalGeneration(config)
    elif head == "cls":
        config.num_labels = 2
        model = t.AutoModelForSequenceClassification.from_config(config)
    elif head == "lm" or arch not in ("bert", "roberta"):
        auto = t.AutoModelForCausalLM if arch not in ("bert", "roberta") else t.AutoModelForMaskedLM
        model = auto.from_config(config)
    else:
        model = t.AutoModel.from_config(config)
    return model.eval()


def tiny_inputs(arch: str, batch: int = 2, seq: int = 7, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded token inputs for :func:`tiny_model` (with an attention mask that pads the last 2 tokens of row 0)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, -2:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    if arch == "switch_transformers":
        inputs["decoder_input_ids"] = ids[:, :4]
    return inputs


def first_output(model: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The first output tensor (logits or last hidden state)."""
    with torch.no_grad():
        out = model(**inputs)
    return out[0] if isinstance(out, tuple) else next(iter(out.values()))
