"""AOT pool stream: determinism per (seed, rank, pool), pairing, ordering across workers, resume."""

import numpy as np
import pytest
import torch

from training import aot
from training.dataset import ImageFolderDataset
from training.augment import AugmentPipe
from training.pools import PoolPrefetcher, PoolStream, auto_workers, iterate_slices
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
    idx = aot.assign(plain['images'], plain['noise'], plain['labels'], solver=solver)
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

def assert_same_pools(got, expected):
    for a, b in zip(got, expected, strict=True):
        for key in ['images', 'labels', 'augment_labels', 'noise', 'indices']:
            assert (a[key] is None and b[key] is None) or torch.equal(a[key], b[key]), key
        assert a['stats'] == b['stats']

def single_thread_worker(worker_id):
    torch.set_num_threads(1) # as training_loop's pool workers

@pytest.mark.parametrize('augment', [False, True])
def test_in_process_pools_equal_worker_pools(dataset, augment):
    # The same pools from background threads (several built at once) as from a DataLoader worker
    # process: --workers 0 and --workers N train on the same data.
    make = lambda: PoolStream(dataset, 16, seed=6, start_pool=2, augment_pipe=aug() if augment else None)
    loader = iter(torch.utils.data.DataLoader(make(), batch_size=None, num_workers=1, worker_init_fn=single_thread_worker))
    expected = [next(loader) for _ in range(6)]
    del loader
    prefetcher = PoolPrefetcher(make(), max_ahead=4)
    prefetcher.ahead = 4
    try:
        assert_same_pools([next(prefetcher) for _ in range(6)], expected)
    finally:
        prefetcher.close()
    assert expected[0]['augment_labels'] is None or expected[0]['augment_labels'].abs().sum() > 0 # augmentation fired

def test_concurrent_pool_builds_are_repeatable(dataset):
    # Pools built four at a time, again and again, beside a busy thread: always the pools built one by one.
    make = lambda: PoolStream(dataset, 16, seed=8, augment_pipe=aug())
    expected = [make().make_pool(k) for k in range(8)]
    conv, x = torch.nn.Conv2d(3, 16, 3), torch.randn(8, 3, 8, 8)
    for _ in range(10):
        prefetcher = PoolPrefetcher(make(), max_ahead=4)
        prefetcher.ahead = 4
        try:
            got = []
            for _ in range(8):
                conv(x).sum().backward() # training kernels beside the builds
                got.append(next(prefetcher))
            assert_same_pools(got, expected)
        finally:
            prefetcher.close()

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

#----------------------------------------------------------------------------
# Memory: pools in flight are bounded.

def test_pools_in_flight_stay_within_max_bytes(dataset, monkeypatch):
    stream = PoolStream(dataset, 8, seed=2)
    built = stream.build
    in_flight, most = [0], [0]
    lock = __import__('threading').Lock()
    def slow_build(k, solve=None):
        with lock:
            in_flight[0] += 1
            most[0] = max(most[0], in_flight[0])
        __import__('time').sleep(0.1) # slower than the loop: it waits for every pool
        return built(k, solve)
    monkeypatch.setattr(stream, 'build', slow_build)
    prefetcher = PoolPrefetcher(stream, max_ahead=4, max_bytes=3 * stream.pool_bytes()) # the pool in use + 2 ahead
    reference = PoolStream(dataset, 8, seed=2)
    try:
        for k in range(6):
            assert torch.equal(next(prefetcher)['noise'], reference.make_pool(k)['noise'])
            with lock:
                in_flight[0] -= 1
    finally:
        prefetcher.close()
    # The bound was reached, not passed: the pool in use and 2 ahead, 3 pools' bytes.
    assert prefetcher.max_ahead == 2 and prefetcher.ahead == 2 and most[0] == 3
    assert PoolPrefetcher(stream, max_bytes=stream.pool_bytes()).max_ahead == 1 # always one ahead

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

#----------------------------------------------------------------------------
# lap's solver runs in small helper processes, started as needed.

def test_lap_helpers_start_as_needed_and_stay_small():
    pytest.importorskip('lap', reason='lap not installed (pip install lap)')
    import subprocess, sys
    from training.pools import LapHelpers
    helpers = LapHelpers(limit=2)
    assert helpers.procs == [] # nothing started before the first solve
    rng = np.random.default_rng(0)
    try:
        for _ in range(3):
            costs = [rng.random([n, n], dtype=np.float32) for n in [1, 5, 30]]
            got = helpers.solve(costs)
            assert all(np.array_equal(a, b) for a, b in zip(got, aot.solve_costs(costs, 'scipy')))
        assert len(helpers.procs) == 1 # one at a time needs one helper
    finally:
        helpers.close()
    assert all(proc.returncode == 0 for proc in helpers.procs)
    # The helper imports neither torch nor the training script.
    root = __import__('os').path.dirname(__import__('os').path.dirname(__import__('os').path.abspath(__file__)))
    out = subprocess.run([sys.executable, '-X', 'importtime', '-m', 'training.lap_helper'], input=b'', cwd=root, capture_output=True, check=True)
    imported = {line.split('|')[-1].strip().split('.')[0] for line in out.stderr.decode().splitlines()[1:]}
    assert 'lap' in imported and not imported & {'torch', 'train', 'scipy', 'dnnlib'}

#----------------------------------------------------------------------------
# CUDA: pools are built on streams of their own while the training stream is busy.

def aug():
    return AugmentPipe(p=0.5, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1, brightness=1, hue=1)

def test_cuda_pools_are_handed_over_to_the_training_stream(dataset):
    if not torch.cuda.is_available():
        pytest.skip('needs CUDA: pools built on side streams and used on the training stream')
    device = torch.device('cuda')
    reference = PoolStream(dataset, 16, seed=5, augment_pipe=aug(), device=device)
    expected = [reference.make_pool(k) for k in range(6)] # one at a time, nothing else running
    prefetcher = PoolPrefetcher(PoolStream(dataset, 16, seed=5, augment_pipe=aug(), device=device), max_ahead=3)
    prefetcher.ahead = 3
    busy = torch.randn(4096, 4096, device=device)
    got = []
    try:
        for k in range(6):
            for _ in range(10): # training kernels queued while pools are built beside them
                busy = (busy @ busy).tanh()
            pool = next(prefetcher)
            # Read on the training stream, after which the pool is dropped and its memory may be reused.
            got.append([pool[key].clone() for key in ['images', 'labels', 'augment_labels', 'noise']] + [pool['indices'], pool['stats']])
            del pool
    finally:
        prefetcher.close()
    for k, (images, labels, augment_labels, noise, indices, stats) in enumerate(got):
        ref = expected[k]
        assert torch.equal(indices, ref['indices']) and torch.equal(labels, ref['labels']) and torch.equal(augment_labels, ref['augment_labels'])
        torch.testing.assert_close(images, ref['images'], rtol=0, atol=1e-5)
        # Same noise draws; the pairing may only differ where distances tie to rounding.
        torch.testing.assert_close(noise.sum(dim=0), ref['noise'].sum(dim=0))
        assert stats['cost_after'] == pytest.approx(ref['stats']['cost_after'], rel=1e-5)

def test_cuda_pool_has_the_cpu_pools_augmentation(dataset):
    if not torch.cuda.is_available():
        pytest.skip('needs CUDA: compares a pool built on the GPU with the same pool built on the CPU')
    gpu = PoolStream(dataset, 16, seed=3, augment_pipe=aug(), device='cuda').make_pool(2)
    cpu = PoolStream(dataset, 16, seed=3, augment_pipe=aug()).make_pool(2)
    # Augmentation parameters are drawn on the CPU for both; only the noise generator differs.
    assert torch.equal(gpu['augment_labels'].cpu(), cpu['augment_labels']) and torch.equal(gpu['indices'], cpu['indices'])
    torch.testing.assert_close(gpu['images'].cpu(), cpu['images'], rtol=0, atol=1e-4)
    idx = aot.assign(gpu['images'], gpu['noise'], gpu['labels'])
    assert aot.pairing_cost(gpu['images'], gpu['noise']) == pytest.approx(aot.pairing_cost(gpu['images'], gpu['noise'], idx), rel=1e-6)

