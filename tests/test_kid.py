"""KID (metrics/fid.py calculate_kid) against independent transcriptions of the published estimator
(Binkowski et al. 2018, as torch-fidelity's metric_kid.py computes it) and its statistical properties."""

import itertools
import numpy as np
import pytest
from metrics import fid

#----------------------------------------------------------------------------
# Independent transcriptions, written from the formulas, not from metrics/fid.py.

def kernel_loop(x, y):
    # k(x, y) = (x.y / d + 1)^3, one pair at a time.
    return (sum(a * b for a, b in zip(x, y)) / len(x) + 1.0) ** 3

def mmd2_loops(x, y):
    # Binkowski et al. eq. (unbiased MMD^2 estimator): means over i != j within each set, over all pairs across.
    m = len(x)
    within_x = sum(kernel_loop(x[i], x[j]) for i, j in itertools.permutations(range(m), 2))
    within_y = sum(kernel_loop(y[i], y[j]) for i, j in itertools.permutations(range(m), 2))
    across = sum(kernel_loop(x[i], y[j]) for i in range(m) for j in range(m))
    return (within_x + within_y) / (m * (m - 1)) - 2 * across / (m * m)

def mmd2_masked(x, y):
    # The same estimator with kernel matrices and an off-diagonal mask (torch-fidelity's polynomial_mmd + mmd2).
    d, m = x.shape[1], x.shape[0]
    off = ~np.eye(m, dtype=bool)
    k_xx, k_yy, k_xy = [(u @ v.T * (1.0 / d) + 1.0) ** 3 for u, v in [(x, x), (y, y), (x, y)]]
    return k_xx[off].mean() + k_yy[off].mean() - 2 * k_xy.mean()

def kid_torch_fidelity(features_1, features_2, subsets, subset_size, seed):
    # torch-fidelity's kid_features_to_metric: per subset, draw set 1 then set 2 without replacement from
    # one RandomState; report the mean and the (population) standard deviation of the subsets' MMD^2.
    rng = np.random.RandomState(seed)
    values = []
    for _ in range(subsets):
        f1 = features_1[rng.choice(len(features_1), subset_size, replace=False)]
        f2 = features_2[rng.choice(len(features_2), subset_size, replace=False)]
        values.append(mmd2_masked(f1, f2))
    return np.mean(values), np.std(values)

#----------------------------------------------------------------------------

def test_kid_of_whole_small_sets_equals_the_estimator_written_out_with_loops():
    # One subset of all rows: a permutation of each set, and the estimator does not depend on the order.
    rnd = np.random.RandomState(0)
    x, y = rnd.randn(7, 5), rnd.randn(7, 5) * 1.3 + 0.4
    mean, std = fid.calculate_kid(x, y, num_subsets=3, max_subset_size=7)
    expected = mmd2_loops(x.tolist(), y.tolist())
    assert mean == pytest.approx(expected, rel=1e-10, abs=1e-12)
    assert std == pytest.approx(0, abs=1e-9 * abs(expected))

def test_kid_subsets_follow_torch_fidelity():
    rnd = np.random.RandomState(1)
    gen, ref = rnd.randn(300, 16), rnd.randn(260, 16) * 0.8 + 0.2
    mean, std = fid.calculate_kid(gen, ref, num_subsets=7, max_subset_size=100, seed=5)
    expected_mean, expected_std = kid_torch_fidelity(gen, ref, 7, 100, 5)
    assert mean == pytest.approx(expected_mean, rel=1e-10)
    assert std == pytest.approx(expected_std, rel=1e-8)
    assert std > 0
    assert fid.calculate_kid(gen, ref, num_subsets=7, max_subset_size=100, seed=5) == (mean, std) # reproducible
    assert fid.calculate_kid(gen, ref, num_subsets=7, max_subset_size=100, seed=6) != (mean, std)

def test_kid_defaults_are_100_subsets_of_min_1000_and_n():
    # torch-fidelity's and clean-fid's defaults: 100 subsets of 1000 (clean-fid: of fewer when a set is smaller).
    # (Three subsets here: 100 of 1000 take 16 s in the transcription.)
    assert (fid.KID_SUBSETS, fid.KID_SUBSET_SIZE) == (100, 1000)
    rnd = np.random.RandomState(2)
    gen, ref = rnd.randn(1100, 8), rnd.randn(1050, 8) + 0.1
    assert fid.calculate_kid(gen, ref, num_subsets=3) == pytest.approx(kid_torch_fidelity(gen, ref, 3, 1000, 0), rel=1e-9)
    small = rnd.randn(150, 8)
    assert fid.calculate_kid(small, ref) == pytest.approx(kid_torch_fidelity(small, ref, 100, 150, 0), rel=1e-9)

def test_kid_is_unbiased_for_two_draws_of_one_distribution_and_grows_with_a_shift():
    # E[KID] = 0 for two samples of one distribution at any size: the mean over 300 independent pairs of
    # 40-row sets lies within 3 standard errors of 0 (the biased estimator is ~20 standard errors off).
    rnd = np.random.RandomState(3)
    same = np.array([fid.calculate_kid(rnd.randn(40, 6), rnd.randn(40, 6), num_subsets=1)[0] for _ in range(300)])
    assert abs(same.mean()) < 3 * same.std() / np.sqrt(len(same)), (same.mean(), same.std())
    a, b = rnd.randn(2000, 32), rnd.randn(2000, 32)
    null_mean, null_std = fid.calculate_kid(a, b, num_subsets=20, max_subset_size=500)
    self_mean, self_std = fid.calculate_kid(a, a, num_subsets=20, max_subset_size=500)
    shift_mean, shift_std = fid.calculate_kid(a, b + 0.3, num_subsets=20, max_subset_size=500)
    assert abs(null_mean) < 3 * null_std and abs(self_mean) < 3 * self_std
    assert shift_mean > 10 * max(abs(null_mean), null_std, shift_std)
    assert fid.calculate_kid(a, b + 0.6, num_subsets=20, max_subset_size=500)[0] > 2 * shift_mean

def test_kid_refuses_unusable_features():
    with pytest.raises(fid.FIDError, match='one dimension'):
        fid.calculate_kid(np.zeros([5, 3]), np.zeros([5, 4]))
    with pytest.raises(fid.FIDError, match='at least 2'):
        fid.calculate_kid(np.zeros([1, 3]), np.zeros([5, 3]))

def test_kid_subset_of_reference_features_is_capped_and_seeded():
    features = np.arange(30 * 2, dtype=np.float32).reshape(30, 2)
    np.testing.assert_array_equal(fid.kid_subset(features, num=40), features)
    kept = fid.kid_subset(features, num=10)
    assert kept.shape == (10, 2) and len({tuple(r) for r in kept.tolist()}) == 10
    assert np.all(np.diff(kept[:, 0]) > 0) # rows of the set, in its order
    assert set(map(tuple, kept.tolist())) <= set(map(tuple, features.tolist()))
    np.testing.assert_array_equal(fid.kid_subset(features, num=10), kept)
    assert fid.KID_REF_FEATURES == 10000
