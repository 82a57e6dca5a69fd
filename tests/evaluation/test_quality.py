"""pipeline.evaluation.quality against hand-computed values: PSNR/SSIM on [-1, 1] images, whole and in a
region, the hole/outside split of ``quality``, and the optional (weights-only) metrics."""

import math

import pytest
import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from pipeline.evaluation.quality import optional_metrics, per_image, per_image_agreement, psnr, ssim, summarise
from tests.params import config


def unit_to_signed(x: float) -> float:
    """A [0, 1] intensity as the [-1, 1] value the metrics take."""
    return 2 * x - 1


def test_psnr_of_a_known_error_whole_and_in_a_region():
    # An error of 0.2 on the [-1, 1] scale is 0.1 on [0, 1]: MSE 0.01, PSNR 20 dB; 0.6 -> 0.3: 10 log10(1/0.09).
    target = torch.zeros(2, 3, 8, 8)
    pred = target.clone()
    region = torch.zeros(2, 1, 8, 8)
    region[..., :, :4] = 1
    pred[0] += 0.2
    pred[1, :, :, :4] += 0.2
    pred[1, :, :, 4:] += 0.6
    whole = psnr(pred, target)
    assert whole[0].item() == pytest.approx(20.0, abs=1e-4)
    assert whole[1].item() == pytest.approx(10 * math.log10(1 / ((0.01 + 0.09) / 2)), abs=1e-4)
    inside, outside = psnr(pred, target, region), psnr(pred, target, 1 - region)
    assert inside.tolist() == pytest.approx([20.0, 20.0], abs=1e-4)
    assert outside[1].item() == pytest.approx(10 * math.log10(1 / 0.09), abs=1e-4)


def test_ssim_of_identical_images_is_one_whole_and_in_a_region():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    region = (torch.rand(2, 1, 32, 32) > 0.5).float()
    assert ssim(x, x).tolist() == pytest.approx([1.0, 1.0], abs=1e-5)
    assert ssim(x, x, region).tolist() == pytest.approx([1.0, 1.0], abs=1e-5)


def test_psnr_and_ssim_equal_torchmetrics_on_the_same_inputs():
    torch.manual_seed(0)
    a, b = torch.rand(3, 3, 32, 32), torch.rand(3, 3, 32, 32)
    ref = structural_similarity_index_measure(a, b, data_range=1.0, reduction="none")
    torch.testing.assert_close(ssim(a * 2 - 1, b * 2 - 1), ref)
    ref = peak_signal_noise_ratio(a, b, data_range=1.0, reduction="none", dim=(1, 2, 3))
    torch.testing.assert_close(psnr(a * 2 - 1, b * 2 - 1), ref)


def test_ssim_of_flat_images_by_hand_and_by_region():
    """Left half identical, right half two flat intensities (0.5 vs 0.25). Away from the seam (more than the
    11-px Gaussian window's radius of 5) SSIM is 1 on the left and, with no variance, the luminance term
    (2ab + C1) / (a^2 + b^2 + C1), C1 = 0.01^2, on the right."""
    a, b, c1 = 0.5, 0.25, 0.01**2
    expected = (2 * a * b + c1) / (a * a + b * b + c1)
    pred = torch.full((1, 3, 32, 32), unit_to_signed(a))
    target = pred.clone()
    target[..., 16:] = unit_to_signed(b)
    left, right = torch.zeros(1, 1, 32, 32), torch.zeros(1, 1, 32, 32)
    left[..., :11] = 1
    right[..., 21:] = 1
    assert ssim(pred, target, left).item() == pytest.approx(1.0, abs=1e-5)
    assert ssim(pred, target, right).item() == pytest.approx(expected, abs=1e-5)
    assert ssim(pred, target).item() < expected  # the seam: target varies, pred does not


def test_quality_reads_the_hole_as_masked_and_the_rest_as_unmasked():
    target = torch.zeros(1, 3, 16, 16)
    hole = torch.zeros(1, 1, 16, 16)
    hole[..., 4:12, 4:12] = 1
    pred = target + 0.2 * hole  # wrong only in the hole
    q = summarise(per_image(pred, target, hole))
    assert q["psnr_masked"] == pytest.approx(20.0, abs=1e-4)
    assert q["psnr_unmasked"] == pytest.approx(100.0)  # no error: PSNR's 1e-10 MSE floor
    assert q["ssim_unmasked"] > q["ssim_masked"]
    assert summarise(per_image(pred, target, torch.ones_like(hole)))["psnr_unmasked"] is None  # nothing outside the hole
    assert summarise(per_image_agreement(pred, pred)) == {"agree_psnr": pytest.approx(100.0), "agree_ssim": pytest.approx(1.0)}


def test_missing_weight_path_is_named():
    x = torch.zeros(2, 3, 8, 8)
    values, reasons = optional_metrics(config({"evaluate": {"fid_weights": "/nonexistent/inception.pth"}}).evaluate,
                                       x, x)
    assert values["fid"] is None and "/nonexistent/inception.pth" in reasons["fid"]


def test_cmmd_is_computed_with_local_clip_weights(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                   num_attention_heads=2, image_size=16, patch_size=8,
                                                   projection_dim=8)).save_pretrained(tmp_path / "clip")
    a = torch.rand(4, 3, 16, 16) * 2 - 1
    ec = config({"evaluate": {"cmmd_weights": str(tmp_path / "clip")}}).evaluate
    values, reasons = optional_metrics(ec, a, a.flip(0))
    assert "cmmd" not in reasons and values["cmmd"] == pytest.approx(0.0, abs=1e-6)  # same set of images
    assert optional_metrics(ec, -a, a)[0]["cmmd"] > 0


def test_per_image_without_a_hole_reports_the_hole_metrics_not_applicable():
    """Condition edges has no hole: whole-image PSNR/SSIM as with one, the hole / unmasked columns NaN for
    every image, so summarise reports them None (n/a), never the whole image's values under their names."""
    from pipeline.evaluation.quality import HOLE_KEYS, per_image, summarise

    g = torch.Generator().manual_seed(0)
    pred, target = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1, torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    hole = torch.zeros(2, 1, 16, 16)
    hole[..., 4:8, 4:8] = 1
    got, ref = per_image(pred, target, None), per_image(pred, target, hole)
    assert torch.equal(got["psnr"], ref["psnr"]) and torch.equal(got["ssim"], ref["ssim"])
    assert all(torch.isnan(got[k]).all() for k in HOLE_KEYS)
    s = summarise(got)
    assert s["psnr"] is not None and all(s[k] is None for k in HOLE_KEYS)
