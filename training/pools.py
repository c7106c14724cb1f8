"""AOT pools: the stream of (image, paired noise) batches the training loop consumes.

Each rank draws a pool of P images, augments them, draws P unit noises, pairs them with
`training.aot.assign` and hands the pool to the loop, which trains on it in batch_gpu-sized slices
over the following accumulation rounds and steps. Pools are built in one of two places:

- in DataLoader worker processes (--workers N), ahead, while the previous pool is being trained
  on: the whole pool is built on the CPU; auto_workers() says how many keep a GPU from waiting;
- in the training process (--workers 0), synchronously, when the loop needs the next pool: on the
  training device, so on CUDA the augmentation, the noise and the pairing's distances (knn's
  passes included) run on the GPU; the assignment itself runs on the CPU.

Pool k of rank r is a pure function of (seed, r, k) and of the kind of device that builds it:
image indices come from seeded epoch permutations, augmentation parameters (always drawn on the
CPU) and noise from generators of their own seeded by (seed, r, k) (so the trainer's random streams
are never touched). A resumed run therefore rebuilds exactly the pools, pairings included, that the
interrupted run would have seen. On the CPU both places give identical pools; a CUDA generator draws
other noise than the CPU's.

Nearest-of-K (--nearest-of) replaces the pairing: the candidates of each image are drawn on the CPU
from a generator seeded by its position in the sample sequence, and the nearest is kept.
"""

import math
import time

import numpy as np
import torch

from training import aot

# Pools from this size on are for solver 'knn' (docs/aot-scale.md, "Large-pool solver").
KNN_POOL = 16384

#----------------------------------------------------------------------------

def _mix(*words):
    # A well-mixed 63-bit seed from integers: neighbouring inputs give unrelated streams.
    words = [int(w) & 0xFFFFFFFFFFFFFFFF for w in words]
    return int(np.random.SeedSequence(words).generate_state(2, np.uint64)[0] >> np.uint64(1))

def _pool_seed(seed, rank, pool):
    return _mix(seed, rank, pool)

_EPOCH_TAG = 0x65706f6368 # 'epoch': keeps permutation seeds apart from pool seeds

def _epoch_seed(seed, epoch):
    return _mix(_EPOCH_TAG, seed, epoch)

_NEAREST_TAG = 0x6e656172 # 'near': keeps candidate seeds apart from pool and epoch seeds

def nearest_candidates(seed, positions, k, shape):
    """Nearest-of-K candidates [N, k, *shape] on the CPU: those of the image at position p of the
    endless sample sequence (PoolStream.pool_positions) come from a generator seeded by (seed, p)
    alone, so they are the same for any number of processes, pool size and resume point, and on any
    device."""
    out = torch.empty([len(positions), k, *shape])
    for i, p in enumerate(positions):
        torch.randn([k, *shape], generator=torch.Generator().manual_seed(_mix(_NEAREST_TAG, seed, p)), out=out[i])
    return out

def auto_workers(pool_size, num_classes, cpu_cores_per_gpu, cuda, solver='scipy'):
    """Pool worker processes per GPU for train.py --workers auto: 1 on the CPU (a spare core); on
    CUDA as many as keep the GPU from waiting for pools, leaving a core to the trainer; 0 on CUDA
    for knn pools (solver 'knn', or pools of KNN_POOL and more), whose distance passes are for the
    GPU, not for a worker's single CPU thread: they are built in the training process.

    One worker builds a pool on one core. The count at pool 512 is the one measured to keep an H100
    from waiting at EDM's CIFAR-10 settings; per image, building costs the same at any pool size
    but for the assignment, which grows with the class size n = pool / classes as (n / 512)^1.45
    from a small share of the build at n = 512 (figures: docs/training.md, "How the pairing
    works")."""
    if not cuda:
        return 1
    if solver == 'knn' or pool_size >= KNN_POOL:
        return 0
    n = pool_size / max(num_classes, 1)
    need = math.ceil(4 * (1 + 0.027 * ((n / 512) ** 1.45 - 1)))
    return max(min(need, cpu_cores_per_gpu - 1), 1)

#----------------------------------------------------------------------------

class PoolStream(torch.utils.data.IterableDataset):
    """Yields pools as dicts: images (float32 in [-1, 1], augmented), labels, augment_labels (None
    without augmentation), noise (unit normal, already permuted so that noise[i] is the partner of
    images[i]) on `device`, the dataset indices of the images on the CPU, and `stats` (aot.assign's:
    mean image-noise distance before and after pairing, fraction of images alone in their class).

    pool_size: P images per pool and rank. pair=False gives plain EDM (noise left unpaired).
    nearest_of=K >= 2 (with pair=False): each image takes the nearest of K candidate noises of its
    own (aot.nearest, nearest_candidates) instead.
    device: where augmentation, noise and distances run (the CPU in DataLoader workers).
    """
    def __init__(self, dataset, pool_size, seed=0, rank=0, num_replicas=1, augment_pipe=None,
                 pair=True, solver='scipy', start_pool=0, device='cpu', nearest_of=0):
        super().__init__()
        self.dataset = dataset
        self.pool_size = int(pool_size)
        self.seed = int(seed)
        self.rank = int(rank)
        self.num_replicas = int(num_replicas)
        self.augment_pipe = augment_pipe
        self.pair = pair
        self.solver = solver
        self.start_pool = int(start_pool)
        self.device = torch.device(device)
        self.nearest_of = int(nearest_of)
        assert not (pair and self.nearest_of), 'AOT pairing and nearest-of-K are two couplings; choose one'
        self._perm_cache = {}

    def _epoch_perm(self, epoch):
        perm = self._perm_cache.get(epoch)
        if perm is None:
            perm = np.random.default_rng(_epoch_seed(self.seed, epoch)).permutation(len(self.dataset))
            self._perm_cache = {epoch: perm}
        return perm

    def pool_positions(self, k):
        """Positions of pool k's images in the endless sequence of samples that all ranks share."""
        start = (k * self.num_replicas + self.rank) * self.pool_size
        return np.arange(start, start + self.pool_size)

    def pool_indices(self, k):
        """Dataset indices of pool k: consecutive slices of an endless sequence of seeded epoch
        permutations, so ranks see disjoint images and every epoch covers the data."""
        n = len(self.dataset)
        pos = self.pool_positions(k)
        out = np.empty(self.pool_size, dtype=np.int64)
        for epoch in np.unique(pos // n):
            sel = pos // n == epoch
            out[sel] = self._epoch_perm(int(epoch))[pos[sel] % n]
        return out

    def make_pool(self, k):
        """Pool k: load -> augment -> draw noise -> aot.assign -> permute the noise (or, nearest-of-K:
        draw K candidates per image -> aot.nearest)."""
        idx = self.pool_indices(k)
        items = [self.dataset[int(i)] for i in idx]
        # Labels stay on the host for the class groups; uploads are pinned and asynchronous.
        labels = torch.from_numpy(np.stack([lbl for _, lbl in items]).astype(np.float32))
        images = aot.upload(torch.from_numpy(np.stack([img for img, _ in items])), self.device).to(torch.float32) / 127.5 - 1

        # The pool's own generators: the trainer's random streams are left alone. Augmentation
        # parameters come from the CPU one, so drawing them never waits for the device; on the
        # CPU the noise follows from the same generator.
        gen = torch.Generator().manual_seed(_pool_seed(self.seed, self.rank, k))
        augment_labels = None
        if self.augment_pipe is not None:
            images, augment_labels = self.augment_pipe(images, generator=gen)
        if self.nearest_of:
            candidates = nearest_candidates(self.seed, self.pool_positions(k), self.nearest_of, images.shape[1:])
            noise, stats = aot.nearest(images, aot.upload(candidates, self.device))
        else:
            if self.device.type != 'cpu':
                gen = torch.Generator(self.device).manual_seed(_pool_seed(self.seed, self.rank, k))
            noise = torch.randn(images.shape, device=self.device, generator=gen)
            if self.pair:
                perm, stats = aot.assign(images, noise, labels, self.solver)
                noise = noise[perm]
            else:
                stats = aot.unpaired_stats(images, noise, labels)
        stats.update(aot.noise_stats(images, noise))
        return dict(images=images, labels=aot.upload(labels, self.device), augment_labels=augment_labels,
                    indices=torch.from_numpy(idx), noise=noise, stats=stats)

    def __iter__(self):
        # With several DataLoader workers, worker w builds pools w, w+W, ...; the DataLoader
        # takes from the workers in turn, so pools still arrive in order.
        info = torch.utils.data.get_worker_info()
        k, step = self.start_pool, 1
        if info is not None:
            k, step = k + info.id, info.num_workers
        while True:
            yield self.make_pool(k)
            k += step

#----------------------------------------------------------------------------

def iterate_slices(pools, batch_gpu, skip=0, device='cpu', on_pool=None):
    """Cut the pool stream into batch_gpu slices moved to `device`, skipping the first `skip`
    slices (resume). on_pool(pool, seconds) is told of each pool and how long it took to arrive."""
    pools = iter(pools)
    while True:
        t0 = time.perf_counter()
        pool = next(pools)
        if on_pool is not None:
            on_pool(pool, time.perf_counter() - t0)
        n = pool['images'].shape[0]
        for start in range(skip * batch_gpu, n, batch_gpu):
            # Model inputs go to the device; the dataset indices are bookkeeping and stay on the CPU.
            part = {key: None if val is None else val[start : start + batch_gpu] for key, val in pool.items() if key != 'stats'}
            yield {key: val if key == 'indices' or val is None else val.to(device, non_blocking=True) for key, val in part.items()}
        skip = 0

#----------------------------------------------------------------------------
