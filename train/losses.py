"""Training losses on plain tensors: cross-entropy on labels and distillation from a teacher's logits.

Shapes: logits (B, T, V), labels (B, T) with -100 on padding. Both losses are means over the label tokens
that are not -100, computed in fp32 whatever the logits' dtype (softmax over a 51,865-word vocabulary in
bf16/fp16 loses the small probabilities that distillation is about). A batch with no label token gives 0,
not 0/0 = NaN, so an empty batch can never look like a diverged run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def ce_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy over labels != -100."""
    V = logits.size(-1)
    total = F.cross_entropy(logits.float().reshape(-1, V), labels.reshape(-1), ignore_index=IGNORE_INDEX,
                            reduction="sum")
    n = (labels != IGNORE_INDEX).sum()
    return total / n.clamp_min(1)


def distill_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels_mask: torch.Tensor,
               temperature: float) -> torch.Tensor:
    """KL(teacher || student) at temperature T, times T² (Hinton et al.: keeps gradient size independent
    of T), averaged over the tokens where `labels_mask` is true."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"distill_kl: student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ; the teacher must see the same decoder inputs")
    T = float(temperature)
    log_p_s = F.log_softmax(student_logits.float() / T, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / T, dim=-1)
    kl = F.kl_div(log_p_s, log_p_t, log_target=True, reduction="none").sum(-1)  # (B, T)
    mask = labels_mask.to(kl.dtype)
    return (kl * mask).sum() / mask.sum().clamp_min(1) * (T * T)


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, labels: torch.Tensor,
                 ce_weight: float, kl_weight: float, temperature: float
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ce_weight * CE(labels) + kl_weight * KL(teacher || student). Without a teacher: CE only (weight 1).

    Returns (total, parts) where parts holds the detached `ce` and `kl` terms for logging.
    """
    ce = ce_loss(student_logits, labels)
    if teacher_logits is None:
        return ce, {"ce": ce.detach()}
    kl = distill_kl(student_logits, teacher_logits, labels != IGNORE_INDEX, temperature)
    total = ce_weight * ce + kl_weight * kl
    return total, {"ce": ce.detach(), "kl": kl.detach()}
