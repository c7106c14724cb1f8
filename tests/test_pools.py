"""AOT pool stream: determinism per (seed, rank, pool), pairing, ordering across workers, resume."""

import numpy as np
import pytest
import torch

from training import aot
from training.dataset import ImageFolderDataset
from training.augment import AugmentPipe
from training.pools import KNN_POOL, PoolStream, auto_workers, iterate_slices
from training.testdata import make_dataset

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

@pytest.mark.parametrize('solver', ['scipy', 'knn'])
def test_pairing_is_optimal_permutation_within_class(dataset, solver, monkeypatch):
    monkeypatch.setattr(aot, 'KNN_K', 2) # candidates fewer than a class's noises: the sparse path
    paired = PoolStream(dataset, 20, seed=1, pair=True, solver=solver).make_pool(2)
    plain = PoolStream(dataset, 20, seed=1, pair=False).make_pool(2)
    assert torch.equal(paired['images'], plain['images'])
    # Pairing only permutes the same noise draws, within classes.
    idx, stats = aot.assign(plain['images'], plain['noise'], plain['labels'], solver=solver)
    assert torch.equal(paired['noise'], plain['noise'][idx]) and paired['stats'].items() >= stats.items() # aot.assign is the pool's pairing
    assert torch.equal(plain['labels'][idx], plain['labels'])
    assert aot.pairing_cost(paired['images'], paired['noise']) <= aot.pairing_cost(plain['images'], plain['noise'])

@pytest.mark.parametrize('coupling', [dict(), dict(pair=False, nearest_of=4)])
def test_pool_leaves_global_rng_alone(dataset, coupling):
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    PoolStream(dataset, 8, **coupling).make_pool(0)
    assert torch.equal(torch.rand(3), expected)

def test_workers_deliver_pools_in_order(dataset):
    stream = PoolStream(dataset, 8, seed=2, start_pool=3)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2)
    it = iter(loader)
    for k in range(3, 8):
        assert torch.equal(next(it)['indices'], stream.make_pool(k)['indices'])

def assert_same_pools(got, expected):
    for a, b in zip(got, expected, strict=True):
        for key in ['images', 'labels', 'augment_labels', 'noise', 'indices']:
            assert (a[key] is None and b[key] is None) or torch.equal(a[key], b[key]), key
        assert a['stats'] == b['stats']

def single_thread_worker(worker_id):
    torch.set_num_threads(1) # as training_loop's pool workers

@pytest.mark.parametrize('augment', [False, True])
def test_in_process_pools_equal_worker_pools(dataset, augment):
    # The same pools from the stream iterated in this process (--workers 0) as from a DataLoader
    # worker process: --workers 0 and --workers N train on the same data.
    make = lambda: PoolStream(dataset, 16, seed=6, start_pool=2, augment_pipe=aug() if augment else None)
    loader = iter(torch.utils.data.DataLoader(make(), batch_size=None, num_workers=1, worker_init_fn=single_thread_worker))
    expected = [next(loader) for _ in range(6)]
    del loader
    in_process = iter(make())
    assert_same_pools([next(in_process) for _ in range(6)], expected)
    assert expected[0]['augment_labels'] is None or expected[0]['augment_labels'].abs().sum() > 0 # augmentation fired

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

@pytest.mark.parametrize('solver', ['scipy', 'knn'])
def test_pool_reports_pairing_gain(dataset, solver):
    stream = PoolStream(dataset, 20, seed=1, solver=solver)
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

#----------------------------------------------------------------------------
# Waiting for the device: every read back to the host waits for all the work queued before it.
# OnDevice stands in for tensors on an accelerator (what the pool uploads becomes one, and so does
# everything computed from it) and counts such reads.

class OnDevice(torch.Tensor):
    reads = []
    HOST_READS = {'cpu', 'item', 'tolist', 'numpy', '__array__', '__bool__', '__int__', '__float__', '__index__', 'nonzero', 'unique', '_unique2'}

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        name = getattr(func, '__name__', '')
        if name in cls.HOST_READS:
            cls.reads.append(name)
            with torch._C.DisableTorchFunctionSubclass():
                out = func(*args, **(kwargs or {}))
            return out.as_subclass(torch.Tensor) if isinstance(out, torch.Tensor) else out # on the host now
        return super().__torch_function__(func, types, args, kwargs)

@pytest.fixture
def on_device(monkeypatch):
    from training import augment
    upload = lambda t, device: t.as_subclass(OnDevice)
    monkeypatch.setattr(aot, 'upload', upload)
    monkeypatch.setattr(augment, '_upload', upload)
    cdist = torch.cdist
    calls = []
    monkeypatch.setattr(torch, 'cdist', lambda *args, **kwargs: calls.append(1) or cdist(*args, **kwargs))
    OnDevice.reads = []
    return calls

@pytest.mark.parametrize('num_classes', [1, 4, 13])
def test_one_host_copy_per_pool_whatever_the_classes(tmp_path, on_device, num_classes):
    data = ImageFolderDataset(make_dataset(str(tmp_path), n=100, num_classes=num_classes), use_labels=True)
    pipe = AugmentPipe(p=0.5, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1, brightness=1, hue=1)
    stream = PoolStream(data, 64, seed=1, augment_pipe=pipe)
    for k in range(3):
        OnDevice.reads, on_device[:] = [], []
        pool = stream.make_pool(k)
        assert OnDevice.reads == ['cpu'], (k, OnDevice.reads) # the distances, all at once
        assert isinstance(pool['images'], OnDevice) and isinstance(pool['noise'], OnDevice) # the stand-in is in use
        # One batched cdist per power-of-two class size, not one per class.
        groups = len(pool['labels'].argmax(dim=1).unique())
        assert len(on_device) == 1 if num_classes == 1 else 4 <= groups and len(on_device) < groups
    OnDevice.reads = []
    PoolStream(data, 64, seed=1, augment_pipe=pipe, pair=False).make_pool(0)
    assert OnDevice.reads == ['item'] # the mean distance, for the log
    OnDevice.reads = []
    PoolStream(data, 64, seed=1, augment_pipe=pipe, pair=False, nearest_of=4).make_pool(0)
    assert OnDevice.reads == ['tolist'] # the mean distances before and after

#----------------------------------------------------------------------------

def test_auto_workers():
    assert auto_workers(512, 10, 16, cuda=False) == 1
    # The H100 figure: 4 workers at pool 512 (CIFAR-10); the same for 1000 classes or plain EDM.
    assert auto_workers(512, 1, 16, cuda=True) == auto_workers(512, 10, 16, cuda=True) == 4
    assert auto_workers(512, 1000, 16, cuda=True) == auto_workers(0, 1, 16, cuda=True) == 4
    # Larger classes take longer to solve: more workers, never more than the cores beside the trainer.
    sizes = [auto_workers(p, 1, 64, cuda=True) for p in [512, 2048, 4096, 8192]]
    assert sizes == sorted(sizes) and sizes[-1] > sizes[1] > 4
    assert auto_workers(4096, 10, 64, cuda=True) < sizes[2]
    assert auto_workers(8192, 1, 4, cuda=True) == 3 and auto_workers(512, 1, 1, cuda=True) == 1

def test_auto_workers_keeps_knn_pools_off_single_threaded_cpu_workers():
    # knn's distance passes are for the GPU: built in the training process (0 workers) on CUDA.
    assert auto_workers(512, 10, 16, cuda=True, solver='knn') == 0
    assert auto_workers(KNN_POOL, 10, 16, cuda=True) == auto_workers(4 * KNN_POOL, 1, 64, cuda=True, solver='lap') == 0
    assert auto_workers(KNN_POOL - 512, 10, 16, cuda=True, solver='scipy') >= 4
    # On the CPU the trainer's device is the CPU too: one worker on a spare core, as for any pool.
    assert auto_workers(KNN_POOL, 1, 16, cuda=False, solver='knn') == 1

#----------------------------------------------------------------------------

def aug():
    return AugmentPipe(p=0.5, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1, brightness=1, hue=1)

def test_cuda_pool_has_the_cpu_pools_augmentation(dataset):
    if not torch.cuda.is_available():
        pytest.skip('needs CUDA: compares a pool built on the GPU with the same pool built on the CPU')
    gpu = PoolStream(dataset, 16, seed=3, augment_pipe=aug(), device='cuda').make_pool(2)
    cpu = PoolStream(dataset, 16, seed=3, augment_pipe=aug()).make_pool(2)
    # Augmentation parameters are drawn on the CPU for both; only the noise generator differs.
    assert torch.equal(gpu['augment_labels'].cpu(), cpu['augment_labels']) and torch.equal(gpu['indices'], cpu['indices'])
    torch.testing.assert_close(gpu['images'].cpu(), cpu['images'], rtol=0, atol=1e-4)
    idx, _ = aot.assign(gpu['images'], gpu['noise'], gpu['labels'])
    assert aot.pairing_cost(gpu['images'], gpu['noise']) == pytest.approx(aot.pairing_cost(gpu['images'], gpu['noise'], idx), rel=1e-6)


def test_pool_log_sums_the_wait_and_warns_once_of_images_alone(capsys):
    from training.training_loop import PoolLog
    stats = lambda alone: dict(cost_before=2.0, cost_after=1.0, noise_norm=1.0, noise_proj=0.0, alone=alone)
    log = PoolLog(aot_pool=64)
    for seconds, alone in [(0.5, 0.1), (0.25, 0.3), (0.25, 0.5)]:
        log(dict(stats=stats(alone)), seconds)
    assert log.wait == 1.0
    out = capsys.readouterr().out
    assert out.count('alone in their class') == 1 and '30% of the images of a pool are alone in their class among the 64' in out
    nearest = PoolLog(aot_pool=0) # nearest-of-K pairs no images with each other: nothing to warn of
    nearest(dict(stats=stats(1.0)), 0.0)
    assert capsys.readouterr().out == ''
