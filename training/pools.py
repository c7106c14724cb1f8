"""AOT pools: the stream of (image, paired noise) batches the training loop consumes.

Each rank draws a pool of P images, augments them, draws P unit noises, pairs them with the
assignment of `training.aot` and hands the pool to the loop, which trains on it in batch_gpu-sized
slices over the following accumulation rounds and steps. Pools are built ahead, while the previous
pool is being trained on, in one of two ways:

- in the training process (`PoolPrefetcher`, train.py --workers 0): augmentation, noise and
  distances run on the training device in a background thread, and only the assignment runs on the
  CPU (scipy's solver releases the GIL; lap's does not and runs in a helper process);
- in DataLoader worker processes (--workers N): the whole pool is built on the CPU.

Pool k of rank r is a pure function of (seed, r, k) and of the kind of device that builds it:
image indices come from seeded epoch permutations, augmentation and noise from a generator of its
own seeded by (seed, r, k) (so the trainer's random streams are never touched). A resumed run
therefore rebuilds exactly the pools, pairings included, that the interrupted run would have seen.
On the CPU both ways give identical pools; a CUDA generator draws other numbers than the CPU's.
"""

import collections
import concurrent.futures
import multiprocessing
import threading
import time

import numpy as np
import torch

from training import aot

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

def solve_costs(costs, solver):
    """Columns assigned to the rows of each float32 cost matrix (a list; picklable, so that it can
    run in a helper process)."""
    solve = aot.check_solver(solver)
    return [solve(cost.astype(np.float64)) for cost in costs]

#----------------------------------------------------------------------------

class PoolStream(torch.utils.data.IterableDataset):
    """Yields pools as dicts: images (float32 in [-1, 1], augmented), labels, augment_labels (None
    without augmentation), noise (unit normal, already permuted so that noise[i] is the partner of
    images[i]) on `device`, the dataset indices of the images on the CPU, and `stats` (plain
    numbers: mean image-noise distance before and after pairing, fraction of images alone in their
    class, for which pairing can do nothing).

    pool_size: P images per pool and rank. pair=False gives plain EDM (noise left unpaired).
    device: where augmentation, noise and distances run (the CPU in DataLoader workers).
    """
    def __init__(self, dataset, pool_size, seed=0, rank=0, num_replicas=1, augment_pipe=None,
                 pair=True, solver='scipy', start_pool=0, device='cpu'):
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
        self._perm_cache = {}
        self._load_lock = threading.Lock() # datasets read zip files: one thread at a time

    def __getstate__(self): # DataLoader workers get a copy; locks do not pickle
        return {key: val for key, val in self.__dict__.items() if key != '_load_lock'}

    def __setstate__(self, state):
        self.__dict__.update(state, _load_lock=threading.Lock())

    def _epoch_perm(self, epoch):
        perm = self._perm_cache.get(epoch)
        if perm is None:
            perm = np.random.default_rng(_epoch_seed(self.seed, epoch)).permutation(len(self.dataset))
            self._perm_cache = {epoch: perm}
        return perm

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

    def prepare(self, k):
        """Pool k before the assignment: the pool dict with unpaired noise, and the cost matrices
        (float32 numpy, one per class) that solve_costs() takes."""
        idx = self.pool_indices(k)
        with self._load_lock:
            items = [self.dataset[int(i)] for i in idx]
        images = torch.from_numpy(np.stack([img for img, _ in items])).to(self.device, torch.float32) / 127.5 - 1
        labels = torch.from_numpy(np.stack([lbl for _, lbl in items]).astype(np.float32)).to(self.device)
        # The pool's own generator: the trainer's random streams are left alone.
        gen = torch.Generator(device=self.device).manual_seed(_pool_seed(self.seed, self.rank, k))
        augment_labels = None
        if self.augment_pipe is not None:
            images, augment_labels = self.augment_pipe(images, generator=gen)
        noise = torch.randn(images.shape, device=self.device, generator=gen)
        pool = dict(images=images, labels=labels, augment_labels=augment_labels, noise=noise, indices=torch.from_numpy(idx))

        # Groups and distances as training.aot.assign computes them (same pairings, tested).
        classes = aot.class_indices(labels if labels.shape[1] > 0 else None, len(idx))
        groups = [np.arange(len(idx))] if classes is None else \
            [torch.nonzero(classes == c).flatten().cpu().numpy() for c in torch.unique(classes)]
        x, n = images.flatten(1), noise.flatten(1)
        before = (x - n).norm(dim=1).mean().item()
        alone = sum(len(g) for g in groups if len(g) == 1) / len(idx)
        pool['stats'] = dict(cost_before=before, cost_after=before, alone=alone)
        costs = []
        if self.pair:
            costs = [torch.cdist(x[g], n[g]).cpu().numpy() for g in (torch.from_numpy(g).to(self.device) for g in groups)]
        return pool, groups, costs

    def finish(self, pool, groups, costs, cols):
        """Apply the assignment: noise[i] becomes the partner of images[i]."""
        if self.pair:
            perm = np.empty(len(pool['indices']), dtype=np.int64)
            total = 0.0
            for members, cost, c in zip(groups, costs, cols):
                perm[members] = members[c]
                total += float(cost[np.arange(len(c)), c].astype(np.float64).sum())
            pool['noise'] = pool['noise'][torch.from_numpy(perm).to(self.device)]
            pool['stats']['cost_after'] = total / len(perm)
        return pool

    def make_pool(self, k):
        pool, groups, costs = self.prepare(k)
        return self.finish(pool, groups, costs, solve_costs(costs, self.solver))

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

class PoolPrefetcher:
    """Iterates over the pools of `stream` from start_pool on, building them in background threads
    of this process while the loop trains. One pool is built ahead at first; each time the loop has
    to wait for a pool (after the first), one more is built ahead, up to max_ahead, so that slow
    solvers (large pools) get more pools solved in parallel. Which pools are built does not depend
    on timing: the stream is the same."""

    def __init__(self, stream, max_ahead=4):
        self.stream = stream
        self.max_ahead = max(int(max_ahead), 1)
        self.ahead = 1
        self.next_pool = stream.start_pool
        self.pending = collections.deque()
        self.first = True
        device = stream.device
        init = (lambda: torch.cuda.set_device(device)) if device.type == 'cuda' else None # CUDA's current device is per thread
        self.threads = concurrent.futures.ThreadPoolExecutor(self.max_ahead, thread_name_prefix='aot-pool', initializer=init)
        # lap's solver holds the GIL for the whole solve; a helper process keeps it off the trainer.
        self.solvers = None
        if stream.pair and stream.solver != 'scipy':
            self.solvers = concurrent.futures.ProcessPoolExecutor(self.max_ahead, mp_context=multiprocessing.get_context('spawn'))

    def _build(self, k):
        pool, groups, costs = self.stream.prepare(k)
        if self.solvers is not None:
            cols = self.solvers.submit(solve_costs, costs, self.stream.solver).result()
        else:
            cols = solve_costs(costs, self.stream.solver)
        return self.stream.finish(pool, groups, costs, cols)

    def _fill(self):
        while len(self.pending) < self.ahead:
            self.pending.append(self.threads.submit(self._build, self.next_pool))
            self.next_pool += 1

    def __iter__(self):
        return self

    def __next__(self):
        self._fill()
        future = self.pending.popleft()
        if not future.done() and not self.first and self.ahead < self.max_ahead:
            self.ahead += 1
        self.first = False
        pool = future.result()
        self._fill()
        return pool

    def close(self):
        for future in self.pending:
            future.cancel()
        self.threads.shutdown(wait=True)
        if self.solvers is not None:
            self.solvers.shutdown(wait=True)

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
