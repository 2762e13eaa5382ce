"""Hand-computed checks of onnxlrp.metrics."""

from __future__ import annotations

import numpy as np
import pytest

from onnxlrp.metrics import (
    aopc,
    boxes_to_masks,
    keep_top_percent,
    masked_accuracy,
    num_kept,
    perturbation_curve,
    pointing_game,
    relevance_mass_ratio,
    top_percent_in_mask,
    top_percent_mask,
    weighted_relevance_mass_ratio,
)

# ------------------------------------------------------------------------------------------------------------------
# keep_top_percent
# ------------------------------------------------------------------------------------------------------------------

# 1x1x2x2: flat indices 0..3 with relevance 0.1, -0.5, 0.3, 0.2
X1 = np.array([[[[10.0, 20.0], [30.0, 40.0]]]])
R1 = np.array([[[[0.1, -0.5], [0.3, 0.2]]]])


def _expected(x: np.ndarray, kept_flat: set[int]) -> np.ndarray:
    mask = np.zeros(x.size, dtype=bool)
    mask[list(kept_flat)] = True
    return np.where(mask.reshape(x.shape), x, 0.0)


@pytest.mark.parametrize("per_pixel", [False, True])  # one channel: both granularities agree
@pytest.mark.parametrize(
    ("percent", "absolute", "kept"),
    [
        # signed order: 0.3 (2), 0.2 (3), 0.1 (0), -0.5 (1)
        (25, False, {2}),
        (50, False, {2, 3}),
        (75, False, {2, 3, 0}),
        # absolute order: 0.5 (1), 0.3 (2), 0.2 (3), 0.1 (0)
        (25, True, {1}),
        (50, True, {1, 2}),
        (75, True, {1, 2, 3}),
        (0, True, set()),
        (100, False, {0, 1, 2, 3}),
        (10, False, {2}),  # ceil(0.4) = 1
        (26, True, {1, 2}),  # ceil(1.04) = 2
    ],
)
def test_keep_top_percent_single_channel(percent, absolute, kept, per_pixel):
    out = keep_top_percent(X1, R1, percent, absolute=absolute, per_pixel=per_pixel)
    np.testing.assert_array_equal(out, _expected(X1, kept))
    assert out.dtype == X1.dtype


# 1x2x2x2: channel 0 flat indices 0..3, channel 1 flat indices 4..7
X2 = np.arange(1.0, 9.0).reshape(1, 2, 2, 2)
R2 = np.array([[[[3.0, -1.0], [0.0, 1.0]], [[-2.0, 2.0], [0.5, -4.0]]]])
# pixel sums: p0 = 1, p1 = 1, p2 = 0.5, p3 = -3


@pytest.mark.parametrize(
    ("percent", "absolute", "kept"),
    [
        # values by index: 3, -1, 0, 1, -2, 2, 0.5, -4 -> signed order 0, 5, 3, 6, 2, 1, 4, 7
        (25, False, {0, 5}),
        (50, False, {0, 5, 3, 6}),
        (75, False, {0, 5, 3, 6, 2, 1}),
        # |values| 3, 1, 0, 1, 2, 2, .5, 4 -> order 7, 0, 4, 5 (tie: lower index first), 1, 3 (tie), 6, 2
        (25, True, {7, 0}),
        (50, True, {7, 0, 4, 5}),
        (75, True, {7, 0, 4, 5, 1, 3}),
        (12.5, True, {7}),
    ],
)
def test_keep_top_percent_per_input(percent, absolute, kept):
    out = keep_top_percent(X2, R2, percent, absolute=absolute, per_pixel=False)
    np.testing.assert_array_equal(out, _expected(X2, kept))


@pytest.mark.parametrize(
    ("percent", "absolute", "pixels"),
    [
        # signed pixel order: p0 (1, tie with p1 broken by index), p1, p2, p3
        (25, False, {0}),
        (50, False, {0, 1}),
        (75, False, {0, 1, 2}),
        # absolute pixel order: p3 (3), p0, p1, p2
        (25, True, {3}),
        (50, True, {3, 0}),
        (75, True, {3, 0, 1}),
    ],
)
def test_keep_top_percent_per_pixel_keeps_all_channels(percent, absolute, pixels):
    out = keep_top_percent(X2, R2, percent, absolute=absolute, per_pixel=True)
    kept = {p for p in pixels} | {p + 4 for p in pixels}
    np.testing.assert_array_equal(out, _expected(X2, kept))


def test_keep_top_percent_ranks_each_sample_separately():
    x = np.ones((2, 1, 1, 4))
    r = np.array([[[[4.0, 3.0, 2.0, 1.0]]], [[[1.0, 2.0, 3.0, 4.0]]]])
    out = keep_top_percent(x, r, 50, absolute=False, per_pixel=False)
    np.testing.assert_array_equal(out[:, 0, 0], [[1, 1, 0, 0], [0, 0, 1, 1]])
    assert not np.shares_memory(out, x)


def test_keep_top_percent_flat_inputs_and_mask():
    x = np.array([[5.0, 6.0, 7.0]])
    r = np.array([[-3.0, 1.0, 2.0]])
    np.testing.assert_array_equal(keep_top_percent(x, r, 34, absolute=True, per_pixel=False), [[5.0, 0.0, 7.0]])
    np.testing.assert_array_equal(top_percent_mask(r, 34, absolute=False, per_pixel=False), [[False, True, True]])
    with pytest.raises(ValueError):
        keep_top_percent(x, r, 50, absolute=True, per_pixel=True)  # no channel axis


def test_num_kept_ceil_and_float_noise():
    assert num_kept(25, 4) == 1
    assert num_kept(25.1, 4) == 2
    assert num_kept(0.07 * 100, 100) == 7  # 7.000000000000001 must not keep 8
    assert num_kept(1, 784) == 8  # ceil(7.84)
    assert num_kept(100, 5) == 5
    for bad in (-1, 100.5, float("nan")):
        with pytest.raises(ValueError):
            num_kept(bad, 4)


def test_keep_top_percent_rejects_shape_mismatch():
    with pytest.raises(ValueError):
        keep_top_percent(X1, R2, 50, absolute=True, per_pixel=False)


# ------------------------------------------------------------------------------------------------------------------
# masked_accuracy
# ------------------------------------------------------------------------------------------------------------------


class SumThreshold:
    """Toy classifier: class 0 when the input sum exceeds 2.5, else class 1; records batch sizes."""

    def __init__(self) -> None:
        self.batch_sizes: list[int] = []

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.batch_sizes.append(batch.shape[0])
        s = batch.reshape(batch.shape[0], -1).sum(axis=1)
        return np.stack([s, np.full_like(s, 2.5)], axis=1)


def test_masked_accuracy_toy_model():
    x = np.array([[[[1.0, 1.0], [1.0, 1.0]]], [[[3.0, 0.0], [0.0, 0.0]]]])
    r = np.array([[[[0.4, 0.3], [0.2, 0.1]]], [[[1.0, 0.0], [0.0, 0.0]]]])
    labels = np.array([0, 0])
    # sample 0 keeps sums 1, 2, 3, 4; sample 1 always keeps the 3 -> sum 3
    expected = {25: 0.5, 50: 0.5, 75: 1.0, 100: 1.0, 0: 0.0}
    for batch_size in (1, 2, 5):
        model = SumThreshold()
        acc = masked_accuracy(
            model, x, labels, r, [25, 50, 75, 100, 0], absolute=False, per_pixel=False, batch_size=batch_size
        )
        assert acc == expected
        assert max(model.batch_sizes) <= batch_size
        assert sum(model.batch_sizes) == 2 * 5


def test_masked_accuracy_uses_own_predictions_without_labels():
    x = np.array([[[[1.0, 1.0], [1.0, 1.0]]], [[[1.0, 0.0], [0.0, 0.0]]]])  # unmasked: class 0 and class 1
    r = np.ones_like(x)
    acc = masked_accuracy(SumThreshold(), x, None, r, [25, 100], absolute=True, per_pixel=True, batch_size=8)
    # 25 %: sample 0 -> sum 1 -> class 1 (wrong), sample 1 -> sum 1 -> class 1 (right)
    assert acc == {25: 0.5, 100: 1.0}


def test_masked_accuracy_signed_vs_absolute_differ():
    x = np.array([[[[3.0, 1.0]]]])
    r = np.array([[[[-5.0, 1.0]]]])
    labels = np.array([0])
    signed = masked_accuracy(SumThreshold(), x, labels, r, [50], absolute=False, per_pixel=False, batch_size=4)
    absolute = masked_accuracy(SumThreshold(), x, labels, r, [50], absolute=True, per_pixel=False, batch_size=4)
    assert signed == {50: 0.0}  # keeps the 1 -> sum 1 -> class 1
    assert absolute == {50: 1.0}  # keeps the 3 -> sum 3 -> class 0


# ------------------------------------------------------------------------------------------------------------------
# perturbation curve / AOPC
# ------------------------------------------------------------------------------------------------------------------


def linear_score(w: np.ndarray):
    def score(batch: np.ndarray) -> np.ndarray:
        return (batch * w).reshape(batch.shape[0], -1).sum(axis=1)

    return score


def test_perturbation_curve_linear_morf_lerf_and_aopc():
    w = np.array([[[[4.0, 3.0], [2.0, 1.0]]]])
    x = np.ones((1, 1, 2, 2))
    r = w * x  # exact explanation of a linear model
    morf = perturbation_curve(linear_score(w), x, r, steps=4, order="morf")
    lerf = perturbation_curve(linear_score(w), x, r, steps=4, order="lerf")
    np.testing.assert_allclose(morf, [[10, 6, 3, 1, 0]])
    np.testing.assert_allclose(lerf, [[10, 9, 7, 4, 0]])
    np.testing.assert_allclose(aopc(morf), [(0 + 4 + 7 + 9 + 10) / 5])  # 6
    np.testing.assert_allclose(aopc(lerf), [(0 + 1 + 3 + 6 + 10) / 5])  # 4
    partial = perturbation_curve(linear_score(w), x, r, steps=2)
    np.testing.assert_allclose(partial, [[10, 6, 3]])


def test_perturbation_curve_regions():
    # 4x4 grid of 2x2 patches with weights 1 (top-left), 3 (top-right), 0 (bottom-left), 2 (bottom-right)
    w = np.kron(np.array([[1.0, 3.0], [0.0, 2.0]]), np.ones((2, 2)))[None, None]
    x = np.ones((1, 1, 4, 4))
    curve = perturbation_curve(linear_score(w), x, w, steps=4, region=2)
    np.testing.assert_allclose(curve, [[24, 12, 4, 0, 0]])
    curve = perturbation_curve(linear_score(w), x, w, steps=2, region=2, order="lerf")
    np.testing.assert_allclose(curve, [[24, 24, 20]])


def test_perturbation_curve_ragged_regions_and_step_limit():
    x = np.ones((1, 1, 3, 3))
    w = np.arange(9.0).reshape(1, 1, 3, 3)
    # patches: {0,1,3,4} sum 8, {2,5} sum 7, {6,7} sum 13, {8} sum 8 -> MoRF order: 13, 8 (index 0), 8, 7
    curve = perturbation_curve(linear_score(w), x, w, steps=4, region=2)
    np.testing.assert_allclose(curve, [[36, 23, 15, 7, 0]])
    with pytest.raises(ValueError):
        perturbation_curve(linear_score(w), x, w, steps=5, region=2)


def test_perturbation_curve_fill_mean_and_array():
    x = np.array([[[[1.0, 2.0, 3.0, 6.0]]]])  # channel mean 3
    w = np.ones_like(x)
    curve = perturbation_curve(linear_score(w), x, x * w, steps=4, fill="mean")
    np.testing.assert_allclose(curve, [[12, 9, 9, 10, 12]])
    curve = perturbation_curve(linear_score(w), x, x * w, steps=1, fill=np.array([[[[0, 0, 0, -1.0]]]]))
    np.testing.assert_allclose(curve, [[12, 5]])
    curve = perturbation_curve(linear_score(w), x, x * w, steps=1, fill=0.5)
    np.testing.assert_allclose(curve, [[12, 6.5]])


def test_perturbation_curve_per_pixel_vs_per_input():
    w = np.array([[[[5.0, 1.0]], [[-4.0, 2.0]]]])  # [1, 2, 1, 2]; pixel sums 1 and 3
    x = np.ones_like(w)
    per_pixel = perturbation_curve(linear_score(w), x, w, steps=2, per_pixel=True)
    np.testing.assert_allclose(per_pixel, [[4, 1, 0]])
    per_input = perturbation_curve(linear_score(w), x, w, steps=4, per_pixel=False)
    np.testing.assert_allclose(per_input, [[4, -1, -3, -4, 0]])


def test_perturbation_curve_batch_and_flat_inputs():
    w = np.array([[1.0, 2.0, 3.0]])
    x = np.array([[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]])
    r = np.array([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0]])  # opposite rankings
    curve = perturbation_curve(linear_score(w), x, r, steps=3, per_pixel=False)
    np.testing.assert_allclose(curve, [[6, 5, 3, 0], [12, 6, 2, 0]])
    np.testing.assert_allclose(aopc(curve), [(0 + 1 + 3 + 6) / 4, (0 + 6 + 10 + 12) / 4])
    with pytest.raises(ValueError):
        perturbation_curve(linear_score(w), x, r, steps=1, region=2, per_pixel=False)
    with pytest.raises(ValueError):
        perturbation_curve(linear_score(w), x, r, steps=1, order="random")


def test_aopc_one_dimensional_curve():
    np.testing.assert_allclose(aopc(np.array([1.0, 0.5, 0.0])), [0.5])


# ------------------------------------------------------------------------------------------------------------------
# pointing game
# ------------------------------------------------------------------------------------------------------------------


def test_boxes_to_masks_exclusive_end_and_axes():
    masks = boxes_to_masks(np.array([[0, 0, 1, 2], [1, 0, 3, 1]]), (2, 3))
    np.testing.assert_array_equal(masks[0], [[1, 0, 0], [1, 0, 0]])  # column 0, rows 0..1
    np.testing.assert_array_equal(masks[1], [[0, 1, 1], [0, 0, 0]])  # row 0, columns 1..2
    clipped = boxes_to_masks([[-5, 1, 10, 10]], (1, 2, 2, 3))  # clipped, shape taken from (.., H, W)
    np.testing.assert_array_equal(clipped[0], [[0, 0, 0], [1, 1, 1]])
    union = boxes_to_masks([np.array([[0, 0, 1, 1], [2, 1, 3, 2]])], (2, 3))
    np.testing.assert_array_equal(union[0], [[1, 0, 0], [0, 0, 1]])
    with pytest.raises(ValueError):
        boxes_to_masks([[0.5, 0, 1, 1]], (2, 2))


def test_pointing_game_hit_and_miss():
    r = np.array([[[[0.0, 1.0], [2.0, 0.0]]]])  # max at row 1, column 0
    hit = boxes_to_masks([[0, 1, 1, 2]], (2, 2))
    miss = boxes_to_masks([[1, 0, 2, 1]], (2, 2))
    assert pointing_game(r, hit).tolist() == [True]
    assert pointing_game(r, miss).tolist() == [False]
    assert pointing_game(r[:, 0], hit).tolist() == [True]  # [B, H, W] input
    both = pointing_game(np.concatenate([r, r]), np.concatenate([hit, miss]))
    assert both.tolist() == [True, False]


def test_pointing_game_sums_channels():
    # channel 0 alone peaks at (0, 0), but the channel sum peaks at (1, 1)
    r = np.array([[[[5.0, 0.0], [0.0, 4.0]], [[-3.0, 0.0], [0.0, 1.0]]]])
    mask_11 = boxes_to_masks([[1, 1, 2, 2]], (2, 2))
    assert pointing_game(r, mask_11).tolist() == [True]


def test_pointing_game_ties():
    r = np.array([[[[1.0, 0.0], [0.0, 1.0]]]])  # maxima at (0, 0) and (1, 1)
    m00 = boxes_to_masks([[0, 0, 1, 1]], (2, 2))
    m11 = boxes_to_masks([[1, 1, 2, 2]], (2, 2))
    assert pointing_game(r, m00).tolist() == [False]  # default "all"
    assert pointing_game(r, m00, ties="any").tolist() == [True]
    assert pointing_game(r, m00, ties="first").tolist() == [True]
    assert pointing_game(r, m11, ties="first").tolist() == [False]
    assert pointing_game(r, m00 | m11).tolist() == [True]
    zero = np.zeros((1, 1, 2, 2))
    assert pointing_game(zero, np.ones((1, 2, 2), dtype=bool)).tolist() == [True]
    assert pointing_game(zero, m00).tolist() == [False]
    assert pointing_game(r, np.zeros((1, 2, 2), dtype=bool), ties="any").tolist() == [False]


def test_pointing_game_tolerance():
    r = np.zeros((1, 1, 3, 3))
    r[0, 0, 0, 0] = 1.0
    corner = boxes_to_masks([[2, 2, 3, 3]], (3, 3))  # distance sqrt(8) ~ 2.83
    edge = boxes_to_masks([[2, 0, 3, 1]], (3, 3))  # distance 2
    assert pointing_game(r, corner, tolerance=2).tolist() == [False]
    assert pointing_game(r, corner, tolerance=2.9).tolist() == [True]
    assert pointing_game(r, edge, tolerance=1).tolist() == [False]
    assert pointing_game(r, edge, tolerance=2).tolist() == [True]
    with pytest.raises(ValueError):
        pointing_game(r, np.ones((1, 2, 2), dtype=bool))


# ------------------------------------------------------------------------------------------------------------------
# relevance mass ratios (Kohlbrenner et al. eq. 5)
# ------------------------------------------------------------------------------------------------------------------


def test_relevance_mass_ratios_single_channel():
    r = np.array([[[[2.0, -1.0], [1.0, 1.0]]]])  # positive total 4
    left = boxes_to_masks([[0, 0, 1, 2]], (2, 2))  # column 0: 2 + 1 = 3 -> mu 3/4
    right = boxes_to_masks([[1, 0, 2, 2]], (2, 2))  # column 1: -1 ignored, 1 -> mu 1/4
    np.testing.assert_allclose(relevance_mass_ratio(r, left), [0.75])
    np.testing.assert_allclose(weighted_relevance_mass_ratio(r, left), [0.75 * 4 / 2])
    np.testing.assert_allclose(relevance_mass_ratio(r, right), [0.25])
    np.testing.assert_allclose(weighted_relevance_mass_ratio(r, right), [0.25 * 4 / 2])
    one = boxes_to_masks([[0, 0, 1, 1]], (2, 2))  # 2 of 4 in 1 of 4 pixels
    np.testing.assert_allclose(relevance_mass_ratio(r, one), [0.5])
    np.testing.assert_allclose(weighted_relevance_mass_ratio(r, one), [2.0])
    full = np.ones((1, 2, 2), dtype=bool)
    np.testing.assert_allclose(relevance_mass_ratio(r, full), [1.0])
    np.testing.assert_allclose(weighted_relevance_mass_ratio(r, full), [1.0])


def test_relevance_mass_ratios_sum_channels_before_clipping():
    c0 = [[2.0, -1.0], [1.0, 1.0]]
    c1 = [[-1.0, 3.0], [0.0, 0.0]]
    r = np.array([[c0, c1]])  # pixel sums [[1, 2], [1, 1]] -> positive total 5
    left = boxes_to_masks([[0, 0, 1, 2]], (2, 2))  # 1 + 1 = 2
    np.testing.assert_allclose(relevance_mass_ratio(r, left), [0.4])  # element-wise clipping would give 3/7
    np.testing.assert_allclose(weighted_relevance_mass_ratio(r, left), [0.8])


def test_relevance_mass_ratios_batch_and_undefined_cases():
    r = np.array([[[1.0, 0.0], [0.0, 3.0]], [[-1.0, -2.0], [0.0, 0.0]]])  # [B, H, W]
    masks = np.array([[[True, False], [False, False]], [[True, True], [False, False]]])
    mu = relevance_mass_ratio(r, masks)
    np.testing.assert_allclose(mu[0], 0.25)
    assert np.isnan(mu[1])  # no positive relevance: undefined
    muw = weighted_relevance_mass_ratio(r, masks)
    np.testing.assert_allclose(muw[0], 0.25 * 4)
    assert np.isnan(muw[1])
    empty = np.zeros((1, 2, 2), dtype=bool)
    np.testing.assert_allclose(relevance_mass_ratio(r[:1], empty), [0.0])
    assert np.isnan(weighted_relevance_mass_ratio(r[:1], empty)[0])


def test_top_percent_in_mask():
    r = np.array([[[[4.0, -3.0], [2.0, 1.0]]]])
    left = boxes_to_masks([[0, 0, 1, 2]], (2, 2))
    # absolute order: 4 (in), -3 (out), 2 (in), 1 (out)
    np.testing.assert_allclose(top_percent_in_mask(r, left, 25), [1.0])
    np.testing.assert_allclose(top_percent_in_mask(r, left, 50), [0.5])
    np.testing.assert_allclose(top_percent_in_mask(r, left, 50, absolute=False), [1.0])  # 4 and 2
    assert np.isnan(top_percent_in_mask(r, left, 0)[0])
