"""The recovery stage on tiny models: loss goes down, the scale stays frozen, resume == uninterrupted, errors."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from test_finetune_fixtures import e2e_rows, sentiment_rows, word_tokenizer, write_csv, write_tsv
from tiny import tiny_model
from tolerances import (
    FINETUNE_CLS_LOSS_RATIO,
    FINETUNE_CLS_MIN_ACCURACY_GAIN,
    FINETUNE_DISTILL_LOSS_RATIO,
    FINETUNE_DISTILL_MIN_AGREEMENT_GAIN,
    FINETUNE_HIDDEN_DISTANCE_RATIO,
    FINETUNE_LM_PERPLEXITY_RATIO,
    FLOAT64_ATOL,
    FP32_EXACT_ATOL,
    MIN_CHANGE,
)

from edgefuse.config.finetune import DataConfig, FinetuneConfig
from edgefuse.config.fusion import FusionConfig
from edgefuse.errors import ConfigError, DataError, OutputExistsError
from edgefuse.finetune.api import finetune_
from edgefuse.finetune.checkpoint import list_checkpoints
from edgefuse.finetune.data import load_finetune_data
from edgefuse.finetune.evaluate import evaluate
from edgefuse.finetune.setup import build_optimizer, lr_lambda, trainable_parameters
from edgefuse.fusion.api import fuse_mlps_
from edgefuse.fusion.scale import iter_scaled


def cls_data(tmp_path: Path, n_train: int = 96, n_val: int = 32, labels: bool = True):
    rows = sentiment_rows(n_train + n_val)
    if not labels:
        rows = [{"sentence": r["sentence"]} for r in rows]
    tr = write_tsv(tmp_path / "train.tsv", rows[:n_train])
    va = write_tsv(tmp_path / "val.tsv", rows[n_train:])
    cfg = DataConfig(train=str(tr), validation=str(va), label_column="label" if labels else None)
    return load_finetune_data(cfg, word_tokenizer("bert"), "sequence-classification")


def lm_data(tmp_path: Path, n: int = 80):
    path = write_csv(tmp_path / "e2e.csv", e2e_rows(n))
    cfg = DataConfig(
        train=str(path),
        validation_fraction=0.25,
        group_column="mr",
        prompt_column="mr",
        text_column="ref",
        prompt_separator=" ",
    )
    return load_finetune_data(cfg, word_tokenizer("lm"), "causal-lm")


def fused_cls(seed: int = 0, **config):
    model = tiny_model("bert", head="cls", seed=seed)
    for k, v in config.items():
        setattr(model.config, k, v)
    fuse_mlps_(model, FusionConfig(keep_ratio=0.5))
    return model


CLS_CFG = dict(task="sequence-classification", batch_size=8, learning_rate=2e-2, warmup_ratio=0.0, log_every_steps=1)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def test_classification_loss_goes_down_and_accuracy_rises(tmp_path):
    data = cls_data(tmp_path)
    model = fused_cls()
    before = evaluate(model, data.validation, "sequence-classification", pad_token_id=data.pad_token_id)
    res = finetune_(model, FinetuneConfig(max_steps=50, **CLS_CFG), data, progress=False)
    first = sum(v for _, v in res.loss_curve[:5]) / 5
    last = sum(v for _, v in res.loss_curve[-5:]) / 5
    assert last < FINETUNE_CLS_LOSS_RATIO * first, res.loss_curve
    assert res.final_metrics["accuracy"] > before["accuracy"] + FINETUNE_CLS_MIN_ACCURACY_GAIN
    assert res.steps_run == 50 and res.stopped_by == "max_steps" and res.global_batch_size == 8
    assert not model.training  # handed back in eval mode


def test_causal_lm_loss_goes_down_perplexity_and_greedy_samples(tmp_path):
    data = lm_data(tmp_path)
    tok = word_tokenizer("lm")
    model = tiny_model("llama", head="lm")
    fuse_mlps_(model, FusionConfig(keep_ratio=0.5))
    before = evaluate(model, data.validation, "causal-lm", pad_token_id=data.pad_token_id)
    cfg = FinetuneConfig(
        task="causal-lm",
        max_steps=30,
        batch_size=8,
        learning_rate=1e-2,
        log_every_steps=1,
        num_samples=2,
        sample_max_new_tokens=6,
    )
    res = finetune_(model, cfg, data, tokenizer=tok, progress=False)
    assert res.final_metrics["perplexity"] < FINETUNE_LM_PERPLEXITY_RATIO * before["perplexity"]
    assert res.loss_curve[-1][1] < res.loss_curve[0][1]
    assert len(res.samples) == 2 and all(s["prompt"].startswith("name ") and s["generated"] for s in res.samples)
    # the E2E-style split keeps every meaning representation on one side
    assert not set(data.train.prompts) & set(data.validation.prompts)


def test_frozen_scale_is_not_in_the_optimizer_and_does_not_change(tmp_path):
    data = cls_data(tmp_path)
    model = fused_cls()
    scales = {n: m.edgefuse_scale.clone() for n, m in iter_scaled(model)}
    assert len(scales) == 3
    cfg = FinetuneConfig(max_steps=5, **CLS_CFG)
    named = trainable_parameters(model, cfg)
    opt_ids = {id(p) for g in build_optimizer(named, cfg).param_groups for p in g["params"]}
    scale_ptrs = {m.edgefuse_scale.data_ptr() for _, m in iter_scaled(model)}
    assert not any(id(m.edgefuse_scale) in opt_ids for _, m in iter_scaled(model))
    assert not any(p.data_ptr() in scale_ptrs for _, p in named)
    assert not any("edgefuse_scale" in n for n, _ in model.named_parameters())
    up_before = model.bert.encoder.layer[0].intermediate.dense.weight.detach().clone()
    finetune_(model, cfg, data, progress=False)
    for name, module in iter_scaled(model):
        assert torch.equal(module.edgefuse_scale, scales[name])
    # non-vacuous: the fused weights next to the scale did train
    moved = (model.bert.encoder.layer[0].intermediate.dense.weight - up_before).abs().max().item()
    assert moved > MIN_CHANGE


def _interrupt_at_forward(model: torch.nn.Module, n: int) -> None:
    calls = {"n": 0}

    def hook(module, args):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt

    model.register_forward_pre_hook(hook)


def test_resume_equals_uninterrupted_run(tmp_path):
    """With dropout on (so the RNG state matters), a run interrupted after its step-4 checkpoint and resumed
    ends with exactly the weights of an uninterrupted run."""
    data = cls_data(tmp_path)
    cfg = FinetuneConfig(max_steps=8, checkpoint_every_steps=4, eval_every_steps=3, **CLS_CFG)
    drop = {"hidden_dropout_prob": 0.2}

    full = fused_cls(**drop)
    full.bert.encoder.layer[0].output.dropout.p = 0.2
    ref = finetune_(full, cfg, data, output_dir=tmp_path / "a", progress=False)

    broken = fused_cls(**drop)
    broken.bert.encoder.layer[0].output.dropout.p = 0.2
    _interrupt_at_forward(broken, 6)  # during step 6, after the step-4 checkpoint
    with pytest.raises(KeyboardInterrupt):
        finetune_(broken, cfg, data, output_dir=tmp_path / "b", progress=False)
    assert [p.name for p in list_checkpoints(tmp_path / "b")] == ["step-00000004"]
    assert not list((tmp_path / "b" / "checkpoints").glob("*.partial"))

    resumed = fused_cls(**drop)
    resumed.bert.encoder.layer[0].output.dropout.p = 0.2
    res = finetune_(resumed, cfg, data, output_dir=tmp_path / "b", resume=True, progress=False)
    assert res.resumed_from_step == 4 and res.steps_run == 4
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=FP32_EXACT_ATOL, rtol=0), name
    assert res.loss_curve == ref.loss_curve
    assert res.final_metrics == ref.final_metrics


def test_resume_with_other_settings_is_refused(tmp_path):
    data = cls_data(tmp_path)
    finetune_(
        fused_cls(),
        FinetuneConfig(max_steps=2, checkpoint_every_steps=2, **CLS_CFG),
        data,
        output_dir=tmp_path,
        progress=False,
    )
    with pytest.raises(OutputExistsError, match="already holds checkpoints"):
        finetune_(fused_cls(), FinetuneConfig(max_steps=2, **CLS_CFG), data, output_dir=tmp_path, progress=False)
    other = FinetuneConfig(max_steps=2, checkpoint_every_steps=2, **{**CLS_CFG, "learning_rate": 1e-4})
    with pytest.raises(ConfigError, match="different training settings"):
        finetune_(fused_cls(), other, data, output_dir=tmp_path, resume=True, progress=False)
    # a checkpoint of a differently fused model does not fit
    unfused = tiny_model("bert", head="cls")
    with pytest.raises(ConfigError, match="does not fit"):
        finetune_(
            unfused,
            FinetuneConfig(max_steps=2, checkpoint_every_steps=2, **CLS_CFG),
            data,
            output_dir=tmp_path,
            resume=True,
            progress=False,
        )


def test_logit_distillation_without_labels(tmp_path):
    """A user with no labels recovers a fused classifier from its unfused teacher."""
    labeled = cls_data(tmp_path)
    teacher = tiny_model("bert", head="cls")
    finetune_(teacher, FinetuneConfig(max_steps=40, **CLS_CFG), labeled, progress=False)
    data = cls_data(tmp_path, labels=False)
    assert data.train.labels is None
    # a fused student from other random weights: everything it learns about the task comes from the teacher
    student = fused_cls(seed=1)
    before = evaluate(student, data.validation, "sequence-classification", pad_token_id=0, teacher=teacher)
    assert set(before) == {"teacher_agreement", "examples"}  # no labels: agreement with the teacher only
    cfg = FinetuneConfig(max_steps=50, task_weight=0.0, logits_weight=1.0, temperature=1.0, **CLS_CFG)
    res = finetune_(student, cfg, data, teacher=teacher, progress=False)
    assert res.best_metric_name == "teacher_agreement"
    first = sum(v for _, v in res.loss_curve[:5]) / 5
    last = sum(v for _, v in res.loss_curve[-5:]) / 5
    assert last < FINETUNE_DISTILL_LOSS_RATIO * first, res.loss_curve
    assert res.final_metrics["teacher_agreement"] >= before["teacher_agreement"] + FINETUNE_DISTILL_MIN_AGREEMENT_GAIN


def test_hidden_state_distillation_brings_a_fused_encoder_back_to_its_teacher(tmp_path):
    rows = [{"text": r["sentence"]} for r in sentiment_rows(96)]
    (tmp_path / "c.txt").write_text("".join(r["text"] + "\n" for r in rows))
    dcfg = DataConfig(train=str(tmp_path / "c.txt"), validation_fraction=0.25, text_column="text", label_column=None)
    data = load_finetune_data(dcfg, word_tokenizer("bert"), "feature-extraction")
    teacher = tiny_model("bert")
    student = copy.deepcopy(teacher)
    fuse_mlps_(student, FusionConfig(keep_ratio=0.25))
    before = evaluate(student, data.validation, "feature-extraction", pad_token_id=0, teacher=teacher)
    cfg = FinetuneConfig(
        task="feature-extraction",
        task_weight=0.0,
        hidden_weight=1.0,
        max_steps=30,
        batch_size=8,
        learning_rate=3e-3,
        trainable="fused-mlps",
        log_every_steps=1,
    )
    frozen_before = student.embeddings.word_embeddings.weight.clone()
    res = finetune_(student, cfg, data, teacher=teacher, progress=False)
    assert res.final_metrics["hidden_distance"] < FINETUNE_HIDDEN_DISTANCE_RATIO * before["hidden_distance"]
    assert res.final_metrics["embedding_cosine"] >= before["embedding_cosine"]
    # trainable="fused-mlps": only the fused linears moved (the method's layer-wise step, method.md 1.7)
    assert torch.equal(student.embeddings.word_embeddings.weight, frozen_before)
    # ... and the caller gets its requires_grad flags back
    assert all(p.requires_grad for p in student.parameters()) and all(p.requires_grad for p in teacher.parameters())
    assert res.trainable_params == sum(
        p.numel()
        for layer in student.encoder.layer
        for m in (layer.intermediate.dense, layer.output.dense)
        for p in m.parameters()
    )


def test_keep_best_hands_back_the_best_evaluated_weights(tmp_path):
    data = cls_data(tmp_path)
    model = fused_cls()
    # a large constant learning rate makes the curve noisy, so the last evaluation is rarely the best
    cfg = FinetuneConfig(
        max_steps=12, eval_every_steps=2, keep_best=True, scheduler="constant", **{**CLS_CFG, "learning_rate": 5e-2}
    )
    res = finetune_(model, cfg, data, progress=False)
    accs = [e["accuracy"] for e in res.eval_history]
    assert res.best_metric == max(accs)
    again = evaluate(model, data.validation, "sequence-classification", pad_token_id=data.pad_token_id)
    assert again["accuracy"] == res.best_metric == res.final_metrics["accuracy"]


def test_wall_clock_budget_stops_early(tmp_path):
    data = cls_data(tmp_path)
    res = finetune_(fused_cls(), FinetuneConfig(max_steps=50, max_time_s=1e-6, **CLS_CFG), data, progress=False)
    assert res.stopped_by == "max_time_s" and res.steps_run == 1 and "accuracy" in res.final_metrics


def test_moe_routers_stay_frozen(tmp_path):
    data = lm_data(tmp_path, n=40)
    model = tiny_model("mixtral", head="lm")
    fuse_mlps_(model, FusionConfig(keep_ratio=0.5))
    model.config.output_router_logits = True
    model.router_aux_loss_coef = 0.5
    gate = model.model.layers[0].block_sparse_moe.gate.weight.detach().clone()
    res = finetune_(
        model, FinetuneConfig(task="causal-lm", max_steps=3, batch_size=8, num_samples=0), data, progress=False
    )
    assert torch.equal(model.model.layers[0].block_sparse_moe.gate.weight, gate)
    assert model.router_aux_loss_coef == 0.0 and res.trainable_params < sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------ schedule
def test_linear_and_cosine_schedules():
    lin = lr_lambda("linear", total_steps=10, warmup_steps=2)
    cos = lr_lambda("cosine", total_steps=10, warmup_steps=0)
    const = lr_lambda("constant", total_steps=10, warmup_steps=5)
    assert [lin(s) for s in (0, 1, 2, 10)] == [0.0, 0.5, 1.0, 0.0]
    assert cos(0) == 1.0 and abs(cos(5) - 0.5) < FLOAT64_ATOL and abs(cos(10)) < FLOAT64_ATOL
    assert const(5) == const(9) == 1.0 and const(0) == 0.0


# ------------------------------------------------------------------------------------------ errors
def test_distillation_without_teacher_is_a_config_error(tmp_path):
    data = cls_data(tmp_path)
    with pytest.raises(ConfigError, match="teacher"):
        finetune_(fused_cls(), FinetuneConfig(max_steps=1, logits_weight=1.0), data, progress=False)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_steps": 1, "task_weight": 0.0}, "every objective weight is 0"),
        ({}, "give max_steps or epochs"),
        ({"max_steps": 1, "task": "feature-extraction"}, "feature-extraction has no labels"),
        ({"max_steps": 1, "unknown_key": 1}, "unknown_key"),
    ],
)
def test_invalid_config_values(kwargs, match):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=match):
        FinetuneConfig(**kwargs)


def test_data_that_does_not_fit_is_a_data_error(tmp_path):
    data = cls_data(tmp_path, n_train=8, n_val=4)
    with pytest.raises(DataError, match="fewer than one global batch"):
        finetune_(fused_cls(), FinetuneConfig(max_steps=1, batch_size=16), data, progress=False)
    three = tiny_model("bert", head="cls")
    data.train.labels[0] = 2  # a third class, but the head has 2 outputs
    with pytest.raises(DataError, match="3 classes but the model's head has 2"):
        finetune_(three, FinetuneConfig(max_steps=1, batch_size=4), data, progress=False)


def test_wrong_head_or_task_is_a_config_error(tmp_path):
    data = cls_data(tmp_path)
    with pytest.raises(ConfigError, match="classification head"):
        finetune_(tiny_model("bert"), FinetuneConfig(max_steps=1), data, progress=False)
    with pytest.raises(ConfigError, match="prepared for task"):
        finetune_(tiny_model("llama", head="lm"), FinetuneConfig(task="causal-lm", max_steps=1), data, progress=False)
    with pytest.raises(ConfigError, match="no fused MLP"):
        finetune_(
            tiny_model("bert", head="cls"), FinetuneConfig(max_steps=1, trainable="fused-mlps"), data, progress=False
        )


def test_data_config_needs_a_tokenizer(tmp_path):
    with pytest.raises(ConfigError, match="tokenizer"):
        finetune_(fused_cls(), FinetuneConfig(max_steps=1), DataConfig(train="x.tsv"), progress=False)
