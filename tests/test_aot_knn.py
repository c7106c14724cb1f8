"""AOT solver 'knn' for large pools (training/aot.py): chunked candidates, sparse matching, fallback."""

import importlib.util

import numpy as np
import pytest
import scipy.optimize
import torch

from training import aot

def random_rows(m, c, seed, dim=48):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand([m, dim], generator=gen) * 2 - 1, torch.randn([c, dim], generator=gen)

def exact_cost(cost):
    rows, cols = scipy.optimize.linear_sum_assignment(cost)
    return cost[rows, cols].sum()

def is_permutation(idx, num):
    return sorted(np.asarray(idx).tolist()) == list(range(num))

#----------------------------------------------------------------------------

@pytest.mark.parametrize('m, c, k, chunk', [(37, 50, 5, 8), (64, 64, 7, 16), (10, 4, 6, 3), (33, 40, 40, 100)])
@pytest.mark.parametrize('offsets', [False, True])
def test_knn_rows_is_topk_of_cdist(m, c, k, chunk, offsets):
    # Chunks that do and do not divide m, k > c, one chunk larger than m.
    x, n = random_rows(m, c, seed=m + c)
    dist = torch.cdist(x.double(), n.double())
    v = torch.linspace(0, 3, c) if offsets else None
    values, cols = aot.knn_rows(x, n, k, chunk=chunk, offsets=v)
    kk = min(k, c)
    assert values.shape == cols.shape == (m, kk) and values.dtype == np.float32 and cols.dtype == np.int64
    ref = torch.topk(dist - (0 if v is None else v.double()), kk, dim=1, largest=False)
    np.testing.assert_array_equal(cols, ref.indices.numpy())
    # The plain distances of the chosen columns, whatever chose them.
    np.testing.assert_allclose(values, dist.gather(1, ref.indices).numpy(), rtol=1e-5)

def test_solve_sparse_complete_graph_is_exact():
    x, n = random_rows(40, 40, seed=1)
    cost = torch.cdist(x, n).numpy()
    values, cols = aot.knn_rows(x, n, 40, chunk=16)
    idx = aot.solve_sparse(values, cols, 40)
    assert idx.dtype == np.int64 and is_permutation(idx, 40)
    np.testing.assert_allclose(cost[np.arange(40), idx].sum(), exact_cost(cost.astype(np.float64)), rtol=1e-6)

@pytest.mark.parametrize('m', [40, 30])
def test_solve_sparse_offsets_keep_the_optimum(m):
    # Column offsets (the potentials) are subtracted only for a perfect matching, where they cannot
    # move the optimum; with fewer rows than columns they would (large random offsets here), so they are ignored.
    x, n = random_rows(m, 40, seed=5)
    cost = torch.cdist(x, n).double().numpy()
    values, cols = aot.knn_rows(x, n, 40)
    offsets = np.random.default_rng(0).uniform(-50, 50, 40)
    idx = aot.solve_sparse(values, cols, 40, offsets=offsets)
    assert len(set(idx.tolist())) == m
    np.testing.assert_allclose(cost[np.arange(m), idx].sum(), exact_cost(cost), rtol=1e-6)

@pytest.mark.parametrize('seed', range(3))
def test_solve_sparse_offsets_with_the_fallback(seed):
    # Rows 0-9 list 3 of columns 0-4, so half of them go through the fallback's dense block; with
    # offsets the result is still the optimum over that graph (solved densely, missing edges barred).
    # An exactness test only: every perfect matching covers the free columns by the block's edges, so
    # no offsets there (or missing ones) can change the result.
    rng = np.random.default_rng(seed)
    cost = rng.uniform(0, 10, [20, 20])
    cols = np.stack([rng.choice(5, 3, replace=False) for _ in range(10)] + [5 + rng.choice(15, 3, replace=False) for _ in range(10)])
    values = np.take_along_axis(cost, cols, 1)
    stats, found = {}, {}
    def dense(r, c):
        found.update(rows=r, cols=c)
        return cost[np.ix_(r, c)]
    idx = aot.solve_sparse(values, cols, 20, cost=dense, stats=stats, offsets=rng.uniform(-50, 50, 20))
    assert stats['unmatched'] > 0 and is_permutation(idx, 20)
    allowed = np.full([20, 20], 1e6)
    np.put_along_axis(allowed, cols, values, 1)
    allowed[np.ix_(found['rows'], found['cols'])] = cost[np.ix_(found['rows'], found['cols'])]
    np.testing.assert_allclose(cost[np.arange(20), idx].sum(), exact_cost(allowed), rtol=1e-12)

def test_solve_sparse_zero_costs_are_edges():
    # scipy drops explicit zero weights as missing edges; a zero distance must still be usable.
    values = np.array([[0.0, 2.0], [0.0, 5.0]])
    cols = np.array([[0, 1], [1, 0]])
    assert aot.solve_sparse(values, cols, 2).tolist() == [0, 1]

@pytest.mark.parametrize('seed', range(3))
def test_default_k_within_one_percent(seed):
    # A few hundred points in the images' dimension: the default k keeps (nearly) all of the gain.
    gen = torch.Generator().manual_seed(seed)
    images, noise = torch.rand([400, 3, 16, 16], generator=gen) * 2 - 1, torch.randn([400, 3, 16, 16], generator=gen)
    assert aot.KNN_K < 400 # a sparse graph, not the complete one
    stats = {}
    idx = aot.solve_knn(images.flatten(1), noise.flatten(1), stats=stats)
    assert is_permutation(idx, 400)
    assert stats['unmatched'] == 0 # the potentials make the sparse graph enough: no fallback
    identity = aot.pairing_cost(images, noise)
    exact = aot.pairing_cost(images, noise, aot.assign(images, noise)[0])
    knn = aot.pairing_cost(images, noise, torch.from_numpy(idx))
    assert knn <= exact * 1.01
    assert (identity - knn) / (identity - exact) > 0.99 # the honest measure: the gain kept

def test_raw_neighbours_have_no_perfect_matching():
    # Why knn_rows takes column offsets: without them the rows' nearest noises are the same few.
    images, noise = random_rows(300, 300, seed=3, dim=768)
    values, cols = aot.knn_rows(images, noise, 8)
    assert len(np.unique(cols)) < 150
    stats = {}
    assert is_permutation(aot.solve_sparse(values, cols, 300, stats=stats), 300) and stats['unmatched'] > 0

def test_fallback_when_the_graph_has_no_perfect_matching():
    # Every row lists only column 0: one row can have it, the others are solved on the dense block
    # of the rows and columns left over, exactly.
    x, n = random_rows(8, 8, seed=2)
    cost = torch.cdist(x, n).double().numpy()
    values, cols = cost[:, :1], np.zeros([8, 1], dtype=np.int64)
    stats = {}
    idx = aot.solve_sparse(values, cols, 8, cost=lambda r, c: cost[np.ix_(r, c)], stats=stats)
    assert is_permutation(idx, 8) and stats['unmatched'] == 7
    first = int(np.flatnonzero(idx == 0)[0])
    rest = np.delete(np.arange(8), first)
    np.testing.assert_allclose(cost[np.arange(8), idx].sum(), cost[first, 0] + exact_cost(cost[np.ix_(rest, np.arange(1, 8))]), rtol=1e-12)
    # Without the costs of the missing edges it still returns a permutation.
    assert is_permutation(aot.solve_sparse(values, cols, 8), 8)

def test_assign_with_fallback_inside(monkeypatch):
    # k = 1: rows collide on their single candidate, so assign goes through the fallback.
    monkeypatch.setattr(aot, 'KNN_K', 1)
    images, noise = (t.view(64, 3, 4, 4) for t in random_rows(64, 64, seed=4))
    stats = {}
    assert is_permutation(aot.solve_knn(images.flatten(1), noise.flatten(1), stats=stats), 64) and stats['unmatched'] > 0
    idx = aot.assign(images, noise, solver='knn')[0]
    assert is_permutation(idx.numpy(), 64)

@pytest.mark.parametrize('classes', [None, 4])
def test_assign_knn(classes):
    gen = torch.Generator().manual_seed(5)
    images, noise = torch.rand([300, 3, 4, 4], generator=gen) * 2 - 1, torch.randn([300, 3, 4, 4], generator=gen)
    labels = None if classes is None else torch.randint(classes, [300], generator=gen)
    idx = aot.assign(images, noise, labels, solver='knn')[0]
    assert idx.dtype == torch.long and is_permutation(idx.numpy(), 300)
    if labels is not None:
        assert (labels[idx] == labels).all()
    exact = aot.pairing_cost(images, noise, aot.assign(images, noise, labels)[0])
    assert aot.pairing_cost(images, noise, idx) == pytest.approx(exact, rel=1e-3)

def test_solver_names():
    assert aot.DENSE_SOLVERS == ('scipy', 'lap') and 'knn' in aot.SOLVERS
    assert aot.check_solver('knn') is None and callable(aot.check_solver('scipy')) # knn needs no cost matrix
    if importlib.util.find_spec('lap') is not None:
        assert callable(aot.check_solver('lap'))
    for bad in ('hungarian', 'KNN', ''):
        with pytest.raises(ValueError, match=r"^Unknown AOT solver .*; choose one of scipy, lap, knn$"):
            aot.check_solver(bad)
    images, noise = torch.rand([4, 3]), torch.randn([4, 3])
    with pytest.raises(ValueError, match='Unknown AOT solver'):
        aot.assign(images, noise, solver='sinkhorn')

def test_matching_bench_runs_and_finds_the_same_cost():
    from click.testing import CliRunner
    from bench import knn_matching
    result = CliRunner().invoke(knn_matching.main, ['--pools=64,200', '--dim=12', '--rounds=1'])
    assert result.exit_code == 0, result.output
    rows = [line for line in result.output.splitlines() if line.startswith('| 64 ') or line.startswith('| 200 ')]
    assert len(rows) == 4 and all(row.split('|')[-2].strip() == 'yes' for row in rows), result.output # as measured, then in the table
