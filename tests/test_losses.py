"""Each loss term against a direct computation on small tensors."""

import pytest
import torch

from pipeline.distill.losses import af_loss, check_weights, distill_loss, mask_weights, task_loss


def test_task_loss_weights_hole_alpha_and_outside_one_minus_alpha():
    torch.manual_seed(0)
    pred, tgt = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    hole = torch.zeros(2, 1, 3, 3)
    hole[:, :, 1:, 1:] = 1
    alpha = 0.975
    ref = 0.0
    for b in range(2):
        acc = 0.0
        for c in range(4):
            for y in range(3):
                for x in range(3):
                    w = alpha if hole[b, 0, y, x] == 1 else 1 - alpha
                    acc += w * float(pred[b, c, y, x] - tgt[b, c, y, x]) ** 2
        ref += acc / (4 * 9)
    assert task_loss(pred, tgt, hole, alpha).item() == pytest.approx(ref / 2, rel=1e-5)


def test_task_loss_alpha_half_is_half_plain_mse():
    pred, tgt = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    hole = (torch.rand(3, 1, 5, 5) > 0.5).float()
    assert task_loss(pred, tgt, hole, 0.5).item() == pytest.approx(0.5 * torch.mean((pred - tgt) ** 2).item(), rel=1e-5)


def test_distill_loss_is_mse():
    a, b = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    assert distill_loss(a, b).item() == pytest.approx(((a - b) ** 2).mean().item(), rel=1e-6)


def test_af_loss_matches_paper_formula_up_to_factor_four():
    torch.manual_seed(0)
    teacher = [torch.randn(2, 5, 8) for _ in range(5)]
    student = [torch.randn(2, 5, 8) for _ in range(3)]
    pairs = [[0, 1], [2, 3], [4]]
    # the paper: Σ_j ||2 f^S_j - (f^T_2j + f^T_2j+1)||², mean over elements; single partner matched alone
    paper = sum(((2 * student[j] - teacher[2 * j] - teacher[2 * j + 1]) ** 2).mean() for j in range(2))
    paper = paper / 4 + ((student[2] - teacher[4]) ** 2).mean()
    assert af_loss(student, teacher, pairs).item() == pytest.approx(paper.item(), rel=1e-5)


def test_af_loss_skips_layers_without_partner():
    t = [torch.ones(1, 2, 2)]
    s = [torch.zeros(1, 2, 2), torch.full((1, 2, 2), 9.0)]
    assert af_loss(s, t, [[0], []]).item() == pytest.approx(1.0)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="must be binary"):
        mask_weights(torch.tensor([0.0, 0.5, 1.0]), 0.9)
    with pytest.raises(ValueError, match="does not match"):
        task_loss(torch.zeros(2, 4, 3, 3), torch.zeros(2, 4, 3, 3), torch.zeros(2, 1, 4, 4), 0.9)
    with pytest.raises(ValueError, match=r"unknown loss names \['perceptual'\]"):
        check_weights({"task": 1.0, "perceptual": 1.0})
