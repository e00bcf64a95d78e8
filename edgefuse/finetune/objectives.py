"""Recovery objectives: the task loss, logit distillation with a temperature, and layer-wise hidden-state
distillation. Pure functions on tensors.

Every loss is returned as ``(sum, count)`` so that data-parallel ranks can normalise by the *global* count:
with dynamic padding the ranks hold different numbers of tokens, and averaging per-rank means would weight
them wrongly (the loss curve would then differ from a single process with the same global batch).

Example:
    >>> import torch
    >>> s, n = classification_loss(torch.zeros(2, 3), torch.tensor([0, 2]))
    >>> round(float(s / n), 4)  # ln 3
    1.0986
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from edgefuse.finetune.data import IGNORE_INDEX


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy summed over the batch; ``logits`` (batch, classes), ``labels`` (batch,)."""
    loss = F.cross_entropy(logits.float(), labels, reduction="sum")
    return loss, torch.tensor(float(labels.numel()))


def _shifted(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # position t predicts token t+1
    return logits[:, :-1, :], labels[:, 1:]


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy summed over target tokens (``labels`` hold :data:`IGNORE_INDEX` where none is due)."""
    lg, tg = _shifted(logits, labels)
    loss = F.cross_entropy(
        lg.reshape(-1, lg.shape[-1]).float(), tg.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss, (tg != IGNORE_INDEX).sum().float()


def logit_distillation_loss(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float, *, labels: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``T^2 * KL(softmax(teacher/T) || softmax(student/T))`` summed over examples (classification) or over target
    tokens (causal LM: pass the token ``labels`` to select positions; prompt and padding are skipped).

    The ``T^2`` factor keeps gradient magnitudes comparable across temperatures (Hinton et al. 2015).
    """
    t = float(temperature)
    if student.dim() == 3:  # (batch, seq, vocab): score the positions the LM loss scores
        student, tgt = _shifted(
            student, labels if labels is not None else torch.zeros(student.shape[:2], dtype=torch.long)
        )
        teacher = teacher[:, :-1, :]
        keep = tgt != IGNORE_INDEX
        student, teacher = student[keep], teacher[keep]  # (tokens, vocab)
    log_p_s = F.log_softmax(student.float() / t, dim=-1)
    log_p_t = F.log_softmax(teacher.float() / t, dim=-1)
    kl = F.kl_div(log_p_s, log_p_t, log_target=True, reduction="sum") * (t * t)
    return kl, torch.tensor(float(student.shape[0]))


def hidden_state_loss(
    student: Sequence[torch.Tensor],
    teacher: Sequence[torch.Tensor],
    attention_mask: torch.Tensor,
    layers: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer-wise distillation: ``(1/L) sum_l ||h_l - h_l^teacher||^2`` summed over real tokens.

    Args:
        student, teacher: ``hidden_states`` tuples (index 0 the embeddings, 1..L the layer outputs), each
            (batch, seq, hidden).
        attention_mask: (batch, seq); padding is excluded. The paper's code includes padding in the mean, which
            with dynamic padding would make the loss depend on how a batch happens to be padded.
        layers: hidden-state indices to match; None means every layer output 1..L.

    Returns:
        The summed squared distance (averaged over the layers) and the number of real tokens.
    """
    idx = list(layers) if layers is not None else list(range(1, len(teacher)))
    mask = attention_mask.bool()  # (batch, seq)
    total = torch.zeros((), dtype=torch.float32, device=attention_mask.device)
    for i in idx:
        diff = (student[i].float() - teacher[i].float())[mask]  # (tokens, hidden)
        total = total + diff.pow(2).sum()
    return total / len(idx), mask.sum().float()
