"""The control-to-block mapping: one function for injection and for L_af pairing."""

import pytest
import torch

from pipeline.models.mapping import af_pairs, control_to_block, expand_to_blocks, unused_layers


def old_rule(blocks, layers):  # diffusers < 0.32
    return [i // (blocks // layers) for i in range(blocks)]


def new_rule(blocks, layers):  # diffusers >= 0.32
    return [int(i / (blocks / layers)) for i in range(blocks)]


def test_teacher_one_to_one_is_old_rule_and_differs_from_new():
    m = control_to_block(24, 23, "one_to_one", skip_blocks=[23])
    assert m[:23] == old_rule(24, 23)[:23] == list(range(23))
    assert m[23] is None
    assert m[:23] != new_rule(24, 23)[:23]  # new rule: block 1 <- 0, sample 22 unused
    assert 22 not in new_rule(24, 23)[:23]


@pytest.mark.parametrize("layers", [12, 10, 15, 6, 8])
def test_student_interval_equals_stock_rule(layers):
    assert control_to_block(24, layers, "interval") == new_rule(24, layers)


def test_12_layer_student_agrees_with_both_diffusers_rules():
    assert control_to_block(24, 12, "interval") == old_rule(24, 12) == new_rule(24, 12)


def test_af_pairs_23_to_12():
    pairs = af_pairs(24, 23, 12, skip_blocks=[23])
    assert pairs[:11] == [[2 * j, 2 * j + 1] for j in range(11)]
    assert pairs[11] == [22]  # the paper's teacher layer 24 does not exist


def test_af_pairs_23_to_10_and_6_cover_every_teacher_layer_once():
    for layers in (10, 6):
        pairs = af_pairs(24, 23, layers, skip_blocks=[23])
        flat = [t for p in pairs for t in p]
        assert sorted(flat) == list(range(23))
        assert all(pairs)


def test_af_pairs_23_to_15_last_layer_unused():
    pairs = af_pairs(24, 23, 15, skip_blocks=[23])
    assert pairs[14] == []
    assert unused_layers(control_to_block(24, 15, "interval", [23]), 15) == [14]
    assert sorted(t for p in pairs for t in p) == list(range(23))


def test_expand_to_blocks_matches_mapping_under_any_diffusers_rule():
    samples = [torch.full((1, 2, 3), float(i + 1)) for i in range(23)]
    mapping = control_to_block(24, 23, "one_to_one", skip_blocks=[23])
    per_block = expand_to_blocks(samples, mapping)
    assert len(per_block) == 24
    for rule in (old_rule, new_rule):  # with one entry per block, both rules are the identity
        idx = rule(24, 24)
        for block in range(23):
            assert torch.equal(per_block[idx[block]], samples[block])
    assert torch.count_nonzero(per_block[23]) == 0


def test_bad_mapping_inputs_are_named():
    with pytest.raises(ValueError, match="cannot feed"):
        control_to_block(12, 13, "interval")
    with pytest.raises(ValueError, match="unknown convention 'two_to_one'"):
        control_to_block(24, 12, "two_to_one")
