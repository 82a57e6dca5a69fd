"""Each loss term against a direct computation on small tensors, and the sign of the flow-matching target."""

import copy

import pytest
import torch

from pipeline.config import SchedulerConfig
from pipeline.distill.losses import af_loss, check_weights, distill_loss, mask_weights, task_loss
from pipeline.models import flow

SCHED = SchedulerConfig(shift=3.0, weighting_scheme="none", logit_mean=0.0, logit_std=1.0, mode_scale=1.29)


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


def test_flow_noising_is_x0_to_noise_and_target_is_noise_minus_x0():
    torch.manual_seed(0)
    x0 = torch.randn(4, 16, 8, 8)
    sched = flow.training_scheduler(SCHED)
    s = flow.add_noise(x0, sched, SCHED, torch.Generator().manual_seed(0))
    sig = s.sigmas
    assert sig.shape == (4, 1, 1, 1) and bool(((sig > 0) & (sig <= 1)).all())
    assert torch.allclose(s.noisy, (1 - sig) * x0 + sig * s.noise)
    assert torch.allclose(s.timesteps.float() / 1000, sig.flatten())  # what the transformer is told
    tgt = flow.target(s, x0)
    assert torch.equal(tgt, s.noise - x0)
    assert flow.flow_loss(s.noise - x0, tgt, s.weighting).item() == 0
    wrong = flow.flow_loss(x0 - s.noise, tgt, s.weighting).item()  # the flipped sign: 4 x E(noise - x0)^2
    assert wrong == pytest.approx(4 * ((s.noise - x0) ** 2).mean().item(), rel=1e-5) and wrong > 4


def test_flow_target_agrees_with_the_samplers_euler_step():
    """One FlowMatch Euler step from pure noise with the target as the prediction lands on x0: training and
    the stock sampler read the transformer's output with the same sign."""
    torch.manual_seed(0)
    x0, noise = torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4)

    def euler_step(pred):
        sched = copy.deepcopy(flow.training_scheduler(SCHED))
        sched.set_timesteps(1)
        assert float(sched.sigmas[0]) == pytest.approx(1.0) and float(sched.sigmas[1]) == 0
        return sched.step(pred, sched.timesteps[0], noise.clone(), return_dict=False)[0]

    torch.testing.assert_close(euler_step(noise - x0), x0)
    assert (euler_step(x0 - noise) - x0).abs().mean() > 1


def test_flow_loss_weights_samples_and_pixels():
    pred, tgt = torch.randn(2, 3, 2, 2), torch.randn(2, 3, 2, 2)
    w = torch.tensor([1.0, 3.0]).view(2, 1, 1, 1)
    px = torch.rand(2, 1, 2, 2)
    ref = torch.stack([(w[b] * px[b] * (pred[b] - tgt[b]) ** 2).mean() for b in range(2)]).mean()
    assert flow.flow_loss(pred, tgt, w, px).item() == pytest.approx(ref.item(), rel=1e-6)
