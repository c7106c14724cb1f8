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
