"""AOT pools: the stream of (image, paired noise) batches the training loop consumes.

Each rank draws a pool of P images, augments them, draws P unit noises, pairs them with
`training.aot.assign` and hands the pool to the loop, which trains on it in batch_gpu-sized
slices over the following accumulation rounds and steps. Pools are built in DataLoader workers
so that the solver runs while the previous pool is being trained on.

Pool k of rank r is a pure function of (seed, r, k): image indices come from seeded epoch
permutations and augmentation and noise from a generator seeded by (seed, r, k). A resumed run
therefore rebuilds exactly the pools, pairings included, that the interrupted run would have seen.
"""

import time
import numpy as np
import torch

from training import aot

#----------------------------------------------------------------------------

def _pool_seed(seed, rank, pool):
    # Distinct, well-mixed 63-bit seed per (seed, rank, pool).
    return int(np.random.SeedSequence([seed, rank, pool]).generate_state(2, np.uint64)[0] >> np.uint64(1))

class PoolStream(torch.utils.data.IterableDataset):
    """Yields pools as dicts of CPU tensors: images (float32 in [-1, 1], augmented), labels,
    augment_labels (None without augmentation), noise (unit normal, already permuted so that
    noise[i] is the partner of images[i]) and the dataset indices of the images.

    pool_size: P images per pool and rank. pair=False gives plain EDM (noise left unpaired).
    """
    def __init__(self, dataset, pool_size, seed=0, rank=0, num_replicas=1, augment_pipe=None,
                 pair=True, solver='scipy', start_pool=0):
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
        self._perm_cache = {}

    def _epoch_perm(self, epoch):
        if epoch not in self._perm_cache:
            self._perm_cache = {epoch: np.random.RandomState((self.seed + epoch) % (1 << 31)).permutation(len(self.dataset))}
        return self._perm_cache[epoch]

    def pool_indices(self, k):
        """Dataset indices of pool k on this rank: consecutive slices of an endless sequence of
        seeded epoch permutations, so ranks see disjoint images and every epoch covers the data."""
        n = len(self.dataset)
        start = (k * self.num_replicas + self.rank) * self.pool_size
        pos = np.arange(start, start + self.pool_size)
        out = np.empty(self.pool_size, dtype=np.int64)
        for epoch in np.unique(pos // n):
            sel = pos // n == epoch
            out[sel] = self._epoch_perm(int(epoch))[pos[sel] % n]
        return out

    def make_pool(self, k):
        idx = self.pool_indices(k)
        items = [self.dataset[int(i)] for i in idx]
        images = torch.from_numpy(np.stack([img for img, _ in items])).to(torch.float32) / 127.5 - 1
        labels = torch.from_numpy(np.stack([lbl for _, lbl in items]).astype(np.float32))
        # The pool's own generator keeps the trainer's RNG untouched when pools are built in-process.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_pool_seed(self.seed, self.rank, k))
            augment_labels = None
            if self.augment_pipe is not None:
                images, augment_labels = self.augment_pipe(images)
            noise = torch.randn_like(images)
        if self.pair:
            noise = noise[aot.assign(images, noise, labels if labels.shape[1] > 0 else None, solver=self.solver)]
        return dict(images=images, labels=labels, augment_labels=augment_labels, noise=noise,
                    indices=torch.from_numpy(idx))

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

def iterate_slices(pools, batch_gpu, skip=0, device='cpu', on_wait=None):
    """Cut the pool stream into batch_gpu slices moved to `device`, skipping the first `skip`
    slices (resume). on_wait(seconds) is told how long each pool took to arrive."""
    pools = iter(pools)
    while True:
        t0 = time.perf_counter()
        pool = next(pools)
        if on_wait is not None:
            on_wait(time.perf_counter() - t0)
        n = pool['images'].shape[0]
        for start in range(skip * batch_gpu, n, batch_gpu):
            part = {key: None if val is None else val[start : start + batch_gpu] for key, val in pool.items()}
            # Model inputs go to the device; the dataset indices are bookkeeping and stay on the CPU.
            yield {key: val if key == 'indices' or val is None else val.to(device, non_blocking=True) for key, val in part.items()}
        skip = 0

#----------------------------------------------------------------------------
