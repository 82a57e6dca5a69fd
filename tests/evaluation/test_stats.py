"""pipeline/evaluation/stats.py: paired bootstrap intervals and ordering verdicts."""

import numpy as np
import pytest

from pipeline.evaluation.stats import paired_difference, verdict


def test_a_clear_paired_gain_is_reproduced_with_a_ci_around_it():
    rng = np.random.default_rng(0)
    b = rng.normal(18, 2, 200)                 # per-image PSNR spreads ~2 dB ...
    a = b + 0.3 + rng.normal(0, 0.1, 200)      # ... but the paired gain is 0.3 dB
    d = paired_difference(a, b)
    assert d["n"] == 200 and d["mean"] == pytest.approx(0.3, abs=0.03)
    assert d["ci_low"] < d["mean"] < d["ci_high"] and 0.25 < d["ci_low"] and d["ci_high"] < 0.35
    assert verdict(d, "positive") == "reproduced" and verdict(d, "negative") == "reversed"


def test_noise_is_not_significant():
    rng = np.random.default_rng(1)
    b = rng.normal(18, 2, 100)
    d = paired_difference(b + rng.normal(0, 0.5, 100), b)
    assert d["ci_low"] < 0 < d["ci_high"] and verdict(d) == "not significant"


def test_identical_models_give_a_zero_width_interval():
    d = paired_difference([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    assert (d["mean"], d["ci_low"], d["ci_high"]) == (0.0, 0.0, 0.0) and verdict(d) == "not significant"


def test_unpaired_input_is_refused():
    with pytest.raises(ValueError, match="paired"):
        paired_difference([1.0], [2.0])
