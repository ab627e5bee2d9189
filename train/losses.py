"""Training losses on plain tensors: cross-entropy on labels and distillation from a teacher's logits.

Shapes: logits (B, T, V), labels (B, T) with -100 on padding. Both losses are means over the label tokens
that are not -100, computed in fp32 whatever the logits' dtype (softmax over a 51,865-word vocabulary in
bf16/fp16 loses the small probabilities that distillation is about). A batch with no label token gives 0,
not 0/0 = NaN, so an empty batch can never look like a diverged run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from slim.data import IGNORE_INDEX  # the collator's label padding: one definition


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


def hidden_l2(student_states, teacher_states, masks) -> torch.Tensor:
    """Mean over layers of ||h_s - h_t||^2 / ||h_t||^2 on the positions where the mask is true.

    `student_states` / `teacher_states`: sequences of (B, T, C) hidden states of the same layers (e.g. the
    encoder's and the decoder's `hidden_states`), `masks`: one (B, T) bool mask (or None: every position) per
    layer. Dividing by the teacher's energy makes every layer count alike whatever its scale (Whisper's
    residual stream grows through the layers) and the term dimensionless, so its weight transfers between
    model sizes. fp32 inside. What FUTO's whisper-acft and distil-whisper's encoder copy train on: the
    student keeps the teacher's internal function, not only its output distribution.
    """
    if len(student_states) != len(teacher_states) or len(masks) != len(teacher_states):
        raise ValueError(f"hidden_l2: {len(student_states)} student states, {len(teacher_states)} teacher "
                         f"states and {len(masks)} masks; they must pair up layer by layer")
    if not teacher_states:
        raise ValueError("hidden_l2: no hidden states to compare")
    terms = []
    for s, t, m in zip(student_states, teacher_states, masks):
        if s.shape != t.shape:
            raise ValueError(f"hidden_l2: student state {tuple(s.shape)} and teacher state {tuple(t.shape)} differ")
        d = (s.float() - t.float()).pow(2).sum(-1)
        e = t.float().pow(2).sum(-1)
        if m is not None:
            w = m.to(d.dtype)
            d, e = d * w, e * w
        terms.append(d.sum() / e.sum().clamp_min(1e-12))
    return torch.stack(terms).mean()
