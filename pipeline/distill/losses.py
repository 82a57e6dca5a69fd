"""REFINE-CONTROL's tri-level loss: L = λ_task·L_task + λ_distill·L_distill + λ_af·L_af.

- L_task: SD3's weighted flow-matching MSE (pipeline.models.flow.flow_loss, as the backbone and teacher
  train) of the student-controlled backbone against the data target, each latent pixel weighted α inside
  the hole and (1 - α) outside; uniformly 1 (plain MSE) under condition edges, which has no hole.
- L_distill: MSE between the student- and teacher-controlled backbone outputs (same inputs).
- L_af: Σ_j MSE(f^S_j, mean of the teacher layers that feed the same backbone blocks as j), the pairs
  given by pipeline.models.mapping.af_pairs. The paper writes ||2 f^S_j - (f^T_a + f^T_b)||², which is
  4 x this for a pair; the constant is part of λ_af. A student layer with one partner (the last one,
  23 -> 12) is matched to it alone; one with none (fed to no block) has no term.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from pipeline.models.flow import flow_loss

LOSS_NAMES = ("task", "distill", "af")


def check_weights(weights: dict[str, float]) -> None:
    unknown = sorted(set(weights) - set(LOSS_NAMES))
    if unknown:
        raise ValueError(f"loss weights: unknown loss names {unknown}; known: {list(LOSS_NAMES)}")


def mask_weights(hole: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per-latent-pixel weight: alpha in the hole (hole == 1), 1 - alpha outside."""
    if not torch.all((hole == 0) | (hole == 1)):
        bad = hole[(hole != 0) & (hole != 1)].flatten()[:3].tolist()
        raise ValueError(f"mask: must be binary (1 = hole), found values such as {bad}")
    return alpha * hole + (1 - alpha) * (1 - hole)


def task_loss(pred, target, hole, alpha: float, weighting: torch.Tensor | None = None) -> torch.Tensor:
    """The flow-matching loss with every latent pixel weighted by ``mask_weights(hole, alpha)``.

    ``hole=None`` (condition edges, pipeline.models.condition.loss_mask: no hole): every latent pixel weighs
    1, so L_task is SD3's plain flow-matching MSE (flow_loss), the teacher's loss at its scale, and alpha
    plays no part. Reading the hole as the whole image instead would weigh every pixel alpha and silently
    scale lambda_task by alpha; uniform 1 is the ablations' wo_mask reduction (alpha 0.5 with twice the
    task weight) written directly."""
    if hole is None:
        return flow_loss(pred, target, weighting)
    if hole.shape[0] != pred.shape[0] or hole.shape[-2:] != pred.shape[-2:]:
        raise ValueError(f"mask: shape {tuple(hole.shape)} does not match the latents {tuple(pred.shape)}")
    return flow_loss(pred, target, weighting, mask_weights(hole.float(), alpha))


def distill_loss(student_pred, teacher_pred) -> torch.Tensor:
    return F.mse_loss(student_pred.float(), teacher_pred.float())


def af_loss(student_feats: Sequence[torch.Tensor], teacher_feats: Sequence[torch.Tensor],
            pairs: Sequence[Sequence[int]]) -> torch.Tensor:
    if len(pairs) != len(student_feats):
        raise ValueError(f"af_loss: {len(pairs)} pairings for {len(student_feats)} student layers")
    terms = [F.mse_loss(f.float(), torch.stack([teacher_feats[t].float() for t in p]).mean(0))
             for f, p in zip(student_feats, pairs) if p]
    if not terms:
        raise ValueError("af_loss: no student layer has a teacher partner")
    return torch.stack(terms).sum()
