"""AOT pool stream: determinism per (seed, rank, pool), pairing, ordering across workers, resume."""

import numpy as np
import pytest
import torch

from training import aot
from training.dataset import ImageFolderDataset
from training.pools import PoolStream, iterate_slices
from tests.datagen import make_dataset

@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
    return ImageFolderDataset(make_dataset(str(tmp_path_factory.mktemp('data'))), use_labels=True)

def test_pool_is_function_of_seed_rank_index(dataset):
    a = PoolStream(dataset, 16, seed=3, rank=0, num_replicas=2).make_pool(5)
    b = PoolStream(dataset, 16, seed=3, rank=0, num_replicas=2).make_pool(5)
    c = PoolStream(dataset, 16, seed=3, rank=1, num_replicas=2).make_pool(5)
    for key in ['images', 'labels', 'noise', 'indices']:
        assert torch.equal(a[key], b[key])
    assert not set(a['indices'].tolist()) & set(c['indices'].tolist()) # ranks draw disjoint images
    assert not torch.equal(a['noise'], c['noise'])

def test_epoch_covers_dataset(dataset):
    # 40 images, 2 ranks x 10 images: pools 0 and 1 of both ranks cover the first epoch exactly.
    seen = [PoolStream(dataset, 10, rank=r, num_replicas=2).pool_indices(k) for r in range(2) for k in range(2)]
    assert sorted(np.concatenate(seen).tolist()) == list(range(40))

def test_pairing_is_optimal_permutation_within_class(dataset):
    paired = PoolStream(dataset, 20, seed=1, pair=True).make_pool(2)
    plain = PoolStream(dataset, 20, seed=1, pair=False).make_pool(2)
    assert torch.equal(paired['images'], plain['images'])
    # Pairing only permutes the same noise draws, within classes.
    idx = aot.assign(plain['images'], plain['noise'], plain['labels'])
    assert torch.equal(paired['noise'], plain['noise'][idx])
    assert torch.equal(plain['labels'][idx], plain['labels'])
    assert aot.pairing_cost(paired['images'], paired['noise']) <= aot.pairing_cost(plain['images'], plain['noise'])

def test_pool_leaves_global_rng_alone(dataset):
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    PoolStream(dataset, 8).make_pool(0)
    assert torch.equal(torch.rand(3), expected)

def test_workers_deliver_pools_in_order(dataset):
    stream = PoolStream(dataset, 8, seed=2, start_pool=3)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2)
    it = iter(loader)
    for k in range(3, 8):
        assert torch.equal(next(it)['indices'], stream.make_pool(k)['indices'])

def test_slices_resume_where_they_left_off(dataset):
    stream = PoolStream(dataset, 12, seed=4)
    full = iterate_slices(iter(stream), batch_gpu=4)
    parts = [next(full) for _ in range(7)] # pools 0, 1 and the first slice of pool 2
    # 5 slices done = pool 1, slice 2.
    resumed = iterate_slices(iter(PoolStream(dataset, 12, seed=4, start_pool=1)), batch_gpu=4, skip=2)
    for expected in parts[5:]:
        got = next(resumed)
        assert torch.equal(got['images'], expected['images']) and torch.equal(got['noise'], expected['noise'])

def test_seeds_do_not_replay_each_other_shifted(dataset):
    # Epoch permutations from well-mixed seeds: seed s+1 is not seed s one epoch later.
    n = len(dataset)
    for s in [0, 1, 41]:
        later = PoolStream(dataset, n, seed=s).pool_indices(1)   # seed s, epoch 1
        shifted = PoolStream(dataset, n, seed=s + 1).pool_indices(0) # seed s+1, epoch 0
        assert sorted(later.tolist()) == sorted(shifted.tolist()) == list(range(n))
        assert not np.array_equal(later, shifted)

def test_pool_reports_pairing_gain(dataset):
    stream = PoolStream(dataset, 20, seed=1)
    pool = stream.make_pool(2)
    plain = PoolStream(dataset, 20, seed=1, pair=False).make_pool(2)
    stats = pool['stats']
    assert stats['cost_before'] == pytest.approx(aot.pairing_cost(plain['images'], plain['noise']) / 20, rel=1e-6)
    assert stats['cost_after'] == pytest.approx(aot.pairing_cost(pool['images'], pool['noise']) / 20, rel=1e-5)
    assert stats['cost_after'] < stats['cost_before']
    assert plain['stats']['cost_after'] == plain['stats']['cost_before']
    # Images alone in their class within a pool cannot be paired: counted.
    for p in [pool, PoolStream(dataset, 4, seed=1).make_pool(0)]:
        classes = p['labels'].argmax(dim=1)
        assert p['stats']['alone'] == sum(int((classes == c).sum() == 1) for c in classes.unique()) / len(classes)
    assert PoolStream(dataset, 4, seed=1).make_pool(0)['stats']['alone'] > 0
