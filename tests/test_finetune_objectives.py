"""The recovery objectives as pure functions: values against hand computations, masking, scaling."""

from __future__ import annotations

import math

import torch
from tolerances import FP32_EXACT_ATOL

from edgefuse.finetune.data import IGNORE_INDEX
from edgefuse.finetune.objectives import causal_lm_loss, classification_loss, hidden_state_loss, logit_distillation_loss


def test_classification_loss_is_a_sum_with_its_count():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    labels = torch.tensor([0, 1, 0])
    s, n = classification_loss(logits, labels)
    expected = sum(-torch.log_softmax(logits, -1)[i, labels[i]].item() for i in range(3))
    assert n.item() == 3 and math.isclose(s.item(), expected, rel_tol=1e-6)


def test_causal_lm_loss_skips_ignored_positions():
    torch.manual_seed(0)
    logits = torch.randn(1, 4, 5)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 3, 1]])  # prompt of 2 tokens, target tokens 3 and 1
    s, n = causal_lm_loss(logits, labels)
    logp = torch.log_softmax(logits, -1)
    expected = -(logp[0, 1, 3] + logp[0, 2, 1]).item()  # position t predicts token t+1
    assert n.item() == 2 and math.isclose(s.item(), expected, rel_tol=1e-6)


def test_logit_distillation_is_zero_for_identical_logits_and_matches_the_formula():
    torch.manual_seed(0)
    t = torch.randn(4, 3)
    s0, n = logit_distillation_loss(t.clone(), t, 2.0)
    assert abs(s0.item()) < FP32_EXACT_ATOL and n.item() == 4
    st = torch.randn(4, 3)
    temp = 3.0
    p_t = torch.softmax(t / temp, -1)
    manual = (p_t * (torch.log(p_t) - torch.log_softmax(st / temp, -1))).sum() * temp**2
    s, _ = logit_distillation_loss(st, t, temp)
    assert math.isclose(s.item(), manual.item(), rel_tol=1e-5)


def test_logit_distillation_for_lm_uses_only_target_positions():
    torch.manual_seed(0)
    student, teacher = torch.randn(1, 4, 6), torch.randn(1, 4, 6)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 2, 5]])
    s, n = logit_distillation_loss(student, teacher, 1.0, labels=labels)
    changed = student.clone()
    changed[0, 0] += 10.0  # a prompt position: no loss there
    changed[0, 3] += 10.0  # the last position predicts nothing
    s2, _ = logit_distillation_loss(changed, teacher, 1.0, labels=labels)
    assert n.item() == 2 and math.isclose(s.item(), s2.item(), rel_tol=1e-6)


def test_hidden_state_loss_excludes_padding_and_averages_layers():
    torch.manual_seed(0)
    teacher = [torch.randn(2, 3, 4) for _ in range(3)]  # embeddings + 2 layers
    student = [h + 0.5 for h in teacher]
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    s, n = hidden_state_loss(student, teacher, mask)
    # 4 real tokens, each with squared distance 4 * 0.25 = 1 per layer, averaged over the 2 layers
    assert n.item() == 4 and math.isclose(s.item(), 4.0, rel_tol=1e-6)
    student[1][1, 2] += 100.0  # a padded position
    assert math.isclose(hidden_state_loss(student, teacher, mask)[0].item(), 4.0, rel_tol=1e-6)
    only_first = hidden_state_loss(student, teacher, mask, layers=[1])[0]
    assert math.isclose(only_first.item(), 4.0, rel_tol=1e-6)
