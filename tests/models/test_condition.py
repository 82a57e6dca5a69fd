"""pipeline.models.condition: the edge map, the uniform loss weighting under edges, and the models built
for each condition (issue 15)."""

import pytest
import torch
from diffusers import SD3Transformer2DModel

from pipeline.distill.losses import task_loss
from pipeline.models import condition, inpaint
from pipeline.models.flow import flow_loss
from pipeline.models.student import controlnet_from_backbone


def test_sobel_edges_shape_range_determinism():
    torch.manual_seed(0)
    img = torch.rand(2, 3, 16, 12) * 2 - 1
    e = condition.sobel_edges(img)
    assert e.shape == (2, 3, 16, 12) and e.dtype == img.dtype
    assert float(e.min()) >= -1 and float(e.max()) <= 1
    assert torch.equal(e[:, 0], e[:, 1]) and torch.equal(e[:, 0], e[:, 2])  # grey, as an RGB edge image
    assert torch.equal(e, condition.sobel_edges(img.clone()))
    # per image: an image's map does not depend on its batch
    assert torch.equal(condition.sobel_edges(img[1:]), e[1:])


@pytest.mark.parametrize("value", [-1.0, 0.0, 0.3, 1.0])
def test_sobel_edges_zero_on_a_flat_image(value):
    e = condition.sobel_edges(torch.full((1, 3, 8, 8), value))
    assert torch.equal(e, torch.full_like(e, -1.0))  # no edge = -1 everywhere, borders included


def test_sobel_edges_marks_a_step_and_only_there():
    img = torch.full((1, 3, 8, 8), -1.0)
    img[..., 4:] = 1.0  # black | white, a vertical step between columns 3 and 4
    e = condition.sobel_edges(img)[0, 0]
    assert torch.all(e[:, 3:5] > -1) and torch.all(e[:, :3] == -1) and torch.all(e[:, 5:] == -1)
    assert torch.allclose(e[:, 3], torch.tensor(4 / condition.SOBEL_MAX * 2 - 1))  # |gx| = 4 at a unit step


def test_sobel_edges_rejects_bad_shapes():
    with pytest.raises(ValueError, match="image"):
        condition.sobel_edges(torch.zeros(1, 1, 8, 8))


def test_control_image_and_condition_names():
    img, mask = torch.rand(1, 3, 8, 8) * 2 - 1, torch.zeros(1, 1, 8, 8)
    mask[..., 2:5, 2:5] = 1
    assert torch.equal(condition.control_image(img, mask, "inpaint"), inpaint.masked_image(img, mask))
    assert torch.equal(condition.control_image(img, None, "edges"), condition.sobel_edges(img))
    assert condition.extra_conditioning_channels("inpaint") == 1
    assert condition.extra_conditioning_channels("edges") == 0
    with pytest.raises(ValueError, match="condition"):
        condition.check("depth")
    with pytest.raises(ValueError, match="mask"):
        condition.control_image(img, None, "inpaint")


def test_loss_mask_and_uniform_task_loss():
    """Under edges there is no hole: L_task weighs every latent pixel 1, i.e. it is the plain flow-matching
    MSE (the teacher's loss) at its scale, whatever alpha; under inpaint it is unchanged."""
    torch.manual_seed(0)
    pred, target = torch.randn(2, 4, 6, 6), torch.randn(2, 4, 6, 6)
    weighting = torch.rand(2, 1, 1, 1)
    hole = (torch.rand(2, 1, 6, 6) > 0.5).float()
    assert condition.loss_mask(hole, "inpaint") is hole
    assert condition.loss_mask(hole, "edges") is None
    plain = flow_loss(pred, target, weighting)
    for alpha in (0.5, 0.975, 1.0):
        assert torch.equal(task_loss(pred, target, condition.loss_mask(hole, "edges"), alpha, weighting), plain)
    # uniform 1 = the wo_mask ablation's reduction (alpha 0.5, twice the task weight)
    torch.testing.assert_close(2 * task_loss(pred, target, hole, 0.5, weighting), plain)
    # plain MSE without the SD3 weighting
    torch.testing.assert_close(task_loss(pred, target, None, 0.9), ((pred - target) ** 2).mean())
    # inpaint's weighting is untouched
    w = 0.9 * hole + 0.1 * (1 - hole)
    torch.testing.assert_close(task_loss(pred, target, hole, 0.9, weighting),
                               flow_loss(pred, target, weighting, w))


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=3,
                                 attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                 caption_projection_dim=16, pooled_projection_dim=8, out_channels=4,
                                 pos_embed_max_size=8)


@pytest.mark.parametrize("cond, extra", [("inpaint", 1), ("edges", 0)])
def test_controlnet_for_condition(backbone, tmp_path, cond, extra):
    from pipeline.models.world import load_controlnet

    cn = controlnet_from_backbone(backbone, 2, condition=cond)
    assert cn.config.extra_conditioning_channels == extra
    assert cn.pos_embed_input.proj.in_channels == 4 + extra
    cn.save_pretrained(tmp_path)
    loaded = load_controlnet(tmp_path, condition=cond)
    assert loaded.pos_embed_input.proj.in_channels == 4 + extra
    out = loaded(hidden_states=torch.randn(1, 4, 8, 8), timestep=torch.tensor([500.0]),
                 encoder_hidden_states=torch.randn(1, 5, 16), pooled_projections=torch.zeros(1, 8),
                 controlnet_cond=torch.randn(1, 4 + extra, 8, 8), return_dict=False)[0]
    assert len(out) == 2


def test_controlnet_default_is_inpaint(backbone):
    assert controlnet_from_backbone(backbone, 1).config.extra_conditioning_channels == 1
