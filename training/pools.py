"""AOT pools: the stream of (image, paired noise) batches the training loop consumes.

Each rank draws a pool of P images, augments them, draws P unit noises, pairs them with the
assignment of `training.aot` and hands the pool to the loop, which trains on it in batch_gpu-sized
slices over the following accumulation rounds and steps. Pools are built ahead, while the previous
pool is being trained on, in one of two ways:

- in DataLoader worker processes (--workers N): the whole pool is built on the CPU; auto_workers()
  says how many keep a GPU from waiting;
- in the training process (`PoolPrefetcher`, --workers 0): augmentation, noise and distances run
  on the training device in background threads, each pool on a CUDA stream of its own that the
  training stream waits for with an event; the host waits for that stream once per pool (for its
  distances), never for training kernels. Only the assignment runs on the CPU (scipy's solver
  releases the GIL; lap's does not and runs in a small helper process, training/lap_helper.py).

Pool k of rank r is a pure function of (seed, r, k) and of the kind of device that builds it:
image indices come from seeded epoch permutations, augmentation parameters (always drawn on the
CPU) and noise from generators of their own seeded by (seed, r, k) (so the trainer's random streams
are never touched). A resumed run therefore rebuilds exactly the pools, pairings included, that the
interrupted run would have seen. On the CPU both ways give identical pools; a CUDA generator draws
other noise than the CPU's.
"""

import collections
import concurrent.futures
import contextlib
import functools
import math
import os
import pickle
import queue
import subprocess
import sys
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
_NOISE_TAG = 0x6e6f697365 # 'noise': the noise of a global pool, one draw that every rank repeats

def _epoch_seed(seed, epoch):
    return _mix(_EPOCH_TAG, seed, epoch)

# Pools built ahead hold images and noise on the device (in host memory for the CPU): at most this
# many bytes of them, the pool in use included, but always one pool ahead.
MAX_BYTES_AHEAD = 2 << 30

def auto_workers(pool_size, num_classes, cpu_cores_per_gpu, cuda):
    """Pool worker processes per GPU for train.py --workers auto: 1 on the CPU (a spare core); on
    CUDA as many as keep the GPU from waiting for pools, leaving a core to the trainer.

    One worker builds a pool on one core. On an H100 at EDM's CIFAR-10 settings (--aot 512, 3.25
    s/kimg) 1 worker left the loop waiting 5-9% of the time and 4 workers 0.0%: 4 at pool 512.
    Per image, building costs the same at any pool size but for the assignment, which grows with the
    class size n = pool / classes as (n / 512)^1.45 and is ~2.7% of the build at n = 512 (scipy, one
    core: 0.09 ms of ~3.4 ms per image)."""
    if not cuda:
        return 1
    n = pool_size / max(num_classes, 1)
    need = math.ceil(4 * (1 + 0.027 * ((n / 512) ** 1.45 - 1)))
    return max(min(need, cpu_cores_per_gpu - 1), 1)

#----------------------------------------------------------------------------

class PoolStream(torch.utils.data.IterableDataset):
    """Yields pools as dicts: images (float32 in [-1, 1], augmented), labels, augment_labels (None
    without augmentation), noise (unit normal, already permuted so that noise[i] is the partner of
    images[i]) on `device`, the dataset indices of the images on the CPU, and `stats` (plain
    numbers: mean image-noise distance before and after pairing, fraction of images alone in their
    class, for which pairing can do nothing).

    pool_size: P images per pool and rank. pair=False gives plain EDM (noise left unpaired).
    device: where augmentation, noise and distances run (the CPU in DataLoader workers).
    exchange: a GlobalExchange for --aot-scope=global (one assignment over the pools of all ranks).
    """
    def __init__(self, dataset, pool_size, seed=0, rank=0, num_replicas=1, augment_pipe=None,
                 pair=True, solver='scipy', start_pool=0, device='cpu', exchange=None):
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
        self.exchange = exchange if pair and num_replicas > 1 else None
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

    def pool_indices(self, k, rank=None):
        """Dataset indices of pool k on this rank (or another): consecutive slices of an endless sequence
        of seeded epoch permutations, so ranks see disjoint images and every epoch covers the data."""
        n = len(self.dataset)
        start = (k * self.num_replicas + (self.rank if rank is None else rank)) * self.pool_size
        pos = np.arange(start, start + self.pool_size)
        out = np.empty(self.pool_size, dtype=np.int64)
        for epoch in np.unique(pos // n):
            sel = pos // n == epoch
            out[sel] = self._epoch_perm(int(epoch))[pos[sel] % n]
        return out

    def pool_bytes(self):
        """Bytes of a pool's images and noise (float32)."""
        return 2 * 4 * self.pool_size * int(np.prod(self.dataset.image_shape))

    def load(self, k):
        """Pool k without noise: its images (augmented), labels and dataset indices; and the
        generator that drew the augmentation, for the noise that follows it."""
        idx = self.pool_indices(k)
        with self._load_lock:
            items = [self.dataset[int(i)] for i in idx]
        # Labels are grouped by class on the host; uploads are pinned and asynchronous.
        labels = torch.from_numpy(np.stack([lbl for _, lbl in items]).astype(np.float32))
        images = aot.upload(torch.from_numpy(np.stack([img for img, _ in items])), self.device).to(torch.float32) / 127.5 - 1
        # The pool's own generators: the trainer's random streams are left alone. Augmentation
        # parameters come from the CPU one, so drawing them never waits for the device.
        gen = torch.Generator().manual_seed(_pool_seed(self.seed, self.rank, k))
        augment_labels = None
        if self.augment_pipe is not None:
            images, augment_labels = self.augment_pipe(images, generator=gen)
        pool = dict(images=images, labels=aot.upload(labels, self.device), augment_labels=augment_labels, indices=torch.from_numpy(idx))
        return pool, labels, gen

    def pool_classes(self, rank, k):
        """Class index per image (numpy) of pool k of any rank, from the dataset's labels alone (no
        images loaded); None without labels."""
        idx = self.pool_indices(k, rank)
        classes = aot.class_indices(np.stack([self.dataset.get_label(int(i)) for i in idx]), len(idx))
        return None if classes is None else classes.numpy()

    def prepare(self, k):
        """Pool k before the assignment: the pool dict with unpaired noise, the class groups (index
        arrays) and their cost matrices (float32 numpy) that aot.solve_costs() takes."""
        pool, labels, gen = self.load(k)
        images, idx = pool['images'], pool['indices']
        noise_gen = gen if self.device.type == 'cpu' else torch.Generator(self.device).manual_seed(_pool_seed(self.seed, self.rank, k))
        noise = pool['noise'] = torch.randn(images.shape, device=self.device, generator=noise_gen)

        # Groups and distances as training.aot.assign computes them (same pairings, tested): all
        # classes at once, one copy to the host.
        groups = aot.class_groups(aot.class_indices(labels, len(idx)), len(idx))
        x, n = images.flatten(1), noise.flatten(1)
        dense = self.pair and not aot.is_sparse(self.solver) # the large-pool solver never builds cost matrices
        costs = aot.group_costs(x, n, groups) if dense else []
        # Before pairing each image has noise slot i: the diagonals of the costs (no more copies).
        before = sum(float(np.trace(cost, dtype=np.float64)) for cost in costs) / len(idx) if dense else \
            (x - n).norm(dim=1).mean().item()
        alone = sum(len(g) for g in groups if len(g) == 1) / len(idx)
        pool['stats'] = dict(cost_before=before, cost_after=before, alone=alone)
        return pool, groups, costs

    def finish(self, pool, groups, costs, cols):
        """Apply the assignment: noise[i] becomes the partner of images[i]."""
        if self.pair:
            perm = aot.pairing(groups, cols)
            pool['noise'] = pool['noise'][aot.upload(torch.from_numpy(perm), self.device)]
            if costs:
                total = sum(float(cost[np.arange(len(c)), c].astype(np.float64).sum()) for cost, c in zip(costs, cols))
                pool['stats']['cost_after'] = total / len(perm)
            else:
                pool['stats']['cost_after'] = (pool['images'] - pool['noise']).flatten(1).norm(dim=1).mean().item()
        return pool

    def build(self, k, solve=None):
        """Pool k and the CUDA event that marks it ready (None on the CPU); hand_over() makes it
        usable. On CUDA the pool is built on a stream of its own: its kernels run beside the
        training kernels, and its wait for the device waits for its own work only.
        solve: cost matrices -> columns (default: aot.solve_costs here)."""
        solve = solve or functools.partial(aot.solve_costs, solver=self.solver)
        cuda = self.device.type == 'cuda'
        stream = torch.cuda.Stream(self.device) if cuda else None
        with torch.cuda.stream(stream) if cuda else contextlib.nullcontext():
            if self.exchange is not None:
                pool = self.exchange.pair(self, k, solve)
            else:
                pool, groups, costs = self.prepare(k)
                sparse = self.pair and aot.is_sparse(self.solver)
                cols = aot.solve_groups_knn(pool['images'].flatten(1), pool['noise'].flatten(1), groups) if sparse else solve(costs)
                pool = self.finish(pool, groups, costs, cols)
            return pool, stream.record_event() if cuda else None

    def make_pool(self, k):
        """Pool k, ready for use on the current stream."""
        return hand_over(*self.build(k))

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
# --aot-scope=global: one assignment over the pools of all ranks.

class Turns:
    """Lets threads pass in the order of their pool index. The collectives of a process group must
    be issued in the same order on every rank, and several threads build pools at once."""

    def __init__(self, start):
        self.next = start
        self.closed = False
        self.cond = threading.Condition()

    @contextlib.contextmanager
    def __call__(self, k):
        with self.cond:
            self.cond.wait_for(lambda: self.next == k or self.closed)
            if self.closed:
                raise RuntimeError('pool building was stopped')
        try:
            yield
        finally:
            with self.cond:
                self.next += 1
                self.cond.notify_all()

    def close(self):
        with self.cond:
            self.closed = True
            self.cond.notify_all()

def solver_ranks(sizes, world_size):
    """Which rank solves each class group: the largest first, each to the least loaded rank (an
    assignment of n costs ~n^3), so that all ranks agree without talking."""
    load = [0.0] * world_size
    owner = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        owner[i] = min(range(world_size), key=lambda r: load[r])
        load[owner[i]] += float(sizes[i]) ** 3
    return owner

class GlobalExchange:
    """Pairs the pools of all ranks as one pool of W x P images and noises (per class), exactly as one
    process pairing the concatenation would (tested), while the images never leave their rank:

    1. every rank draws the whole pool's W x P noises from one generator seeded by (seed, pool) and
       reads every rank's labels from the dataset (no images), so all know the class groups;
    2. each rank computes the distances from its own images to the noises of their group (its rows
       of every group's cost matrix) and sends them to the rank that solves that group (all_to_all);
    3. each rank solves its groups and the permutation is summed over the ranks (all_reduce).

    Both collectives run on gloo groups of their own (CPU tensors: the costs are on the host for
    the solver anyway), never the gradients' group, each in pool order (Turns), from the threads
    that build pools in the background."""

    def __init__(self, rank, world_size, start_pool):
        self.rank, self.world_size = rank, world_size
        self.groups = [torch.distributed.new_group(backend='gloo') for _ in range(2)]
        self.turns = [Turns(start_pool), Turns(start_pool)]

    def close(self):
        for turns in self.turns:
            turns.close()

    def pair(self, stream, k, solve):
        W, P, r = self.world_size, stream.pool_size, self.rank
        pool, labels, _ = stream.load(k)
        gen = torch.Generator(stream.device).manual_seed(_mix(_NOISE_TAG, stream.seed, k))
        noise = torch.randn([W * P, *pool['images'].shape[1:]], device=stream.device, generator=gen)
        own = aot.class_indices(labels, P)
        classes = None if own is None else np.concatenate([own.numpy() if q == r else stream.pool_classes(q, k) for q in range(W)])
        groups = aot.class_groups(classes, W * P)
        owner = solver_ranks([len(g) for g in groups], W)

        # My rows of every group: distances on the device, one copy to the host.
        x, n = pool['images'].flatten(1), noise.flatten(1)
        mine = [g[(g >= r * P) & (g < (r + 1) * P)] - r * P for g in groups]
        rows = [torch.cdist(x[aot.upload(torch.from_numpy(m), x.device)], n[aot.upload(torch.from_numpy(g), n.device)]).flatten()
                for m, g in zip(mine, groups)]
        flat = torch.cat(rows).cpu().numpy() if rows else np.zeros(0, np.float32)
        sizes = [len(m) * len(g) for m, g in zip(mine, groups)]
        offsets = np.concatenate([[0], np.cumsum(sizes)])

        # Rows to their solvers, in group order; received in rank order, which is group row order.
        send = np.concatenate([flat[offsets[i]:offsets[i + 1]] for d in range(W) for i in range(len(groups)) if owner[i] == d] or [np.zeros(0, np.float32)])
        send_splits = [sum(sizes[i] for i in range(len(groups)) if owner[i] == d) for d in range(W)]
        counts = [np.bincount(g // P, minlength=W) for g in groups] # rows of each group on each rank
        recv_splits = [sum(int(counts[i][q]) * len(groups[i]) for i in range(len(groups)) if owner[i] == r) for q in range(W)]
        recv = torch.empty(sum(recv_splits), dtype=torch.float32)
        with self.turns[0](k):
            start = time.perf_counter() # from here: the collectives, waiting for other ranks included
            torch.distributed.all_to_all_single(recv, torch.from_numpy(send), recv_splits, send_splits, group=self.groups[0])
            exchange_sec = time.perf_counter() - start

        # Solve my groups (each source's rows of them, stacked in rank order); the permutation of the
        # whole pool, summed over the ranks.
        mine_solved = [i for i in range(len(groups)) if owner[i] == r]
        parts = np.split(recv.numpy(), np.cumsum(recv_splits)[:-1])
        by_source = [np.split(parts[q], np.cumsum([int(counts[i][q]) * len(groups[i]) for i in mine_solved])[:-1]) for q in range(W)]
        costs = [np.concatenate([by_source[q][j].reshape(-1, len(groups[i])) for q in range(W)]) for j, i in enumerate(mine_solved)]
        perm = torch.zeros(W * P, dtype=torch.int64)
        start = time.perf_counter()
        for i, cols in zip(mine_solved, solve(costs) if costs else []):
            perm[groups[i]] = torch.from_numpy(groups[i][cols])
        solve_sec = time.perf_counter() - start
        with self.turns[1](k):
            start = time.perf_counter()
            torch.distributed.all_reduce(perm, group=self.groups[1])
            exchange_sec += time.perf_counter() - start

        # My images' partners, and the mean distances before (slot i) and after pairing.
        partners = perm[r * P : (r + 1) * P]
        pool['noise'] = noise[aot.upload(partners, noise.device)]
        before = after = 0.0
        for i, (m, g) in enumerate(zip(mine, groups)):
            block = flat[offsets[i]:offsets[i + 1]].reshape(len(m), len(g)).astype(np.float64)
            before += block[np.arange(len(m)), np.searchsorted(g, m + r * P)].sum()
            after += block[np.arange(len(m)), np.searchsorted(g, perm[m + r * P].numpy())].sum()
        alone = sum(int(counts[i][r]) for i, g in enumerate(groups) if len(g) == 1) / P
        pool['stats'] = dict(cost_before=before / P, cost_after=after / P, alone=alone, exchange_sec=exchange_sec, solve_sec=solve_sec,
                             sent_bytes=send.nbytes, received_bytes=recv.numel() * 4)
        return pool

#----------------------------------------------------------------------------

def hand_over(pool, ready):
    """Pool built on a side stream (ready: its event), made safe to use on the current stream: that
    waits for the pool, and the pool's memory is not reused before its work on it is done."""
    if ready is not None:
        stream = torch.cuda.current_stream(pool['images'].device)
        stream.wait_event(ready)
        for key in ['images', 'labels', 'augment_labels', 'noise']:
            if pool[key] is not None:
                pool[key].record_stream(stream)
    return pool

class PoolPrefetcher:
    """Iterates over the pools of `stream` from start_pool on, building them in background threads
    of this process while the loop trains. One pool is built ahead at first; each time the loop has
    to wait for a pool (after the first), one more is built ahead, up to max_ahead and to what
    MAX_BYTES_AHEAD holds (max_bytes), so that slow solvers (large pools) get more pools solved in
    parallel. Which pools are built does not depend on timing: the stream is the same."""

    def __init__(self, stream, max_ahead=4, max_bytes=MAX_BYTES_AHEAD):
        self.stream = stream
        self.max_ahead = max(min(int(max_ahead), max_bytes // stream.pool_bytes() - 1), 1)
        # A global pool is built by all ranks together: they must have the same pools in flight, so
        # the look-ahead cannot depend on timing.
        self.ahead = 1 if stream.exchange is None else self.max_ahead
        self.next_pool = stream.start_pool
        self.pending = collections.deque()
        self.first = True
        init = None
        if stream.device.type == 'cuda': # CUDA's current device is per thread
            index = torch.cuda.current_device() if stream.device.index is None else stream.device.index
            init = lambda: torch.cuda.set_device(index)
        self.threads = concurrent.futures.ThreadPoolExecutor(self.max_ahead, thread_name_prefix='aot-pool', initializer=init)
        self.solvers = LapHelpers(self.max_ahead) if stream.pair and stream.solver == 'lap' else None

    def _build(self, k):
        return self.stream.build(k, None if self.solvers is None else self.solvers.solve)

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
        pool = hand_over(*future.result())
        self._fill()
        return pool

    def close(self, finish=False):
        """finish: all ranks stop at the same step. Global pools in flight are then built to the end,
        as the other ranks' threads wait for them in their collectives; otherwise they are given up."""
        exchange = self.stream.exchange
        if exchange is not None and finish:
            concurrent.futures.wait(self.pending)
        elif exchange is not None:
            exchange.close()
        for future in self.pending:
            future.cancel()
        self.threads.shutdown(wait=exchange is None or finish)
        if self.solvers is not None:
            self.solvers.close()

class LapHelpers:
    """Processes that run lap's solver (which holds the GIL) beside the trainer: started when a
    solve finds none idle, at most `limit`. Each runs training/lap_helper.py, which imports only
    numpy and lap (not torch, not the training script)."""

    def __init__(self, limit):
        self.limit = limit
        self.idle = queue.Queue()
        self.procs = []
        self.lock = threading.Lock()

    def _start(self):
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        proc = subprocess.Popen([sys.executable, '-m', 'training.lap_helper'], cwd=root, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.procs.append(proc)
        return proc

    def solve(self, costs):
        try:
            proc = self.idle.get_nowait()
        except queue.Empty:
            with self.lock:
                proc = self._start() if len(self.procs) < self.limit else None
            proc = proc or self.idle.get()
        try:
            pickle.dump(costs, proc.stdin)
            proc.stdin.flush()
            cols = pickle.load(proc.stdout)
        except (EOFError, OSError) as err:
            raise RuntimeError(f'the lap solver helper process ended (exit code {proc.poll()}); see its error above, '
                               'or use --aot-solver=scipy') from err
        finally:
            self.idle.put(proc) # even dead: a solve waiting for it then fails too, rather than waiting forever
        return cols

    def close(self):
        for proc in self.procs:
            proc.stdin.close() # the helper returns at the end of its input
            proc.wait()
            proc.stdout.close()

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
