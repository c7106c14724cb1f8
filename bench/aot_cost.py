"""What AOT pairing costs: solver time per pool, and how long training waits for its pools.

1. assign() on random 3x32x32 images and unit noise at each pool size, for every solver
   (scipy's linear_sum_assignment, lap's LAPJV), with the ratio lap/scipy and a check that both
   give pairings of the same cost.
   Large pools (--large-pools; --skip-large to leave out): solver 'knn' (column potentials,
   k candidates per row, sparse exact matching) at each --large-ks k, its alternative
   'sinkhorn-greedy' (bench-only: the same candidates rounded greedily), plain nearest neighbours
   without potentials, and the exact solvers up to --exact-max: seconds, rows that needed the
   fallback, cost against the exact optimum (above --exact-max: knn at --reference-k) and the
   fraction of the pairing's gain over the identity that is kept. --device=cuda runs it on a GPU.
2. One pool built by training.pools.PoolStream (loading, EDM's augmentation at p=0.12, noise,
   distances, scipy's assignment) at each --build-pools size and class count: seconds on one CPU
   thread, as a DataLoader worker builds it (--workers N), and, where CUDA is present, on the GPU
   as the in-process builder does (--workers 0).
3. train.py on one small config (default: the bundled digits, unconditional, a small DDPM++) at --aot 0 and each --train-pools size, with the pools prepared in a
   DataLoader worker (--workers 1) and in the training process (--workers 0): the fraction of the
   wall time the loop spent waiting for a pool (stats.jsonl 'Timing/aot_wait_frac', steady state =
   ticks after the first) and sec/kimg relative to --aot 0.

    python bench/aot_cost.py                       # all parts, rewrites its section of docs/benchmarks.md
    python bench/aot_cost.py --no-train            # solver and pool build timings only (the section keeps the last training part)
    python bench/aot_cost.py --no-builds --no-train --large-pools=512,4096,16384,65536 --device=cuda
"""

import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time

import click
import numpy as np
import torch

from bench import report
from training import aot
from training.augment import AugmentPipe
from training.dataset import ImageFolderDataset
from training.pools import PoolStream
from training.testdata import make_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def parse_list(text, cast=int):
    return [cast(x) for x in text.split(',') if x.strip()]

# The parts after the solver timings (large pools, builds, training) sit between markers of their own
# in the section, each with the run that measured it, so a run that skips a part (--skip-large,
# --no-builds, --no-train) keeps that part's last numbers instead of dropping them.

def installed_solvers():
    """The exact dense solvers whose packages import here: scipy always, lap where it is installed."""
    found = []
    for solver in ['scipy', 'lap']:
        try:
            aot.check_solver(solver)
            found.append(solver)
        except ValueError:
            pass
    return ','.join(found)

def part(name, lines, env):
    stamp = time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())
    return ['', f'<!-- part:{name} -->', *lines, '', f'Part measured {stamp} on {env} at start: `{report.command()}`', f'<!-- /part:{name} -->']

def kept_part(name, measured=()):
    """The last text of part `name`, or with name ending in '*', of every part whose name starts with
    the rest, less those in `measured`."""
    text = open(report.DOC).read() if os.path.isfile(report.DOC) else ''
    names = re.findall(r'<!-- part:(' + re.escape(name.rstrip('*')) + (r'[^ ]*' if name.endswith('*') else '') + r') -->', text)
    lines = []
    for found in names:
        begin, end = f'<!-- part:{found} -->', f'<!-- /part:{found} -->'
        if found not in measured and end in text:
            lines += ['', text[text.index(begin) : text.index(end) + len(end)]]
    return lines

#----------------------------------------------------------------------------

def time_assign(pools, solvers, repeats, shape=(3, 32, 32)):
    """{(pool, solver): best-of-repeats seconds}, plus the relative cost gap between solvers."""
    rows = []
    for pool in pools:
        gen = torch.Generator().manual_seed(pool)
        images = torch.rand([pool, *shape], generator=gen) * 2 - 1
        noise = torch.randn([pool, *shape], generator=gen)
        times, costs = {}, {}
        for solver in solvers:
            best = float('inf')
            for _ in range(repeats):
                start = time.perf_counter()
                idx, _ = aot.assign(images, noise, solver=solver)
                best = min(best, time.perf_counter() - start)
            times[solver], costs[solver] = best, aot.pairing_cost(images, noise, idx)
        gap = (max(costs.values()) - min(costs.values())) / min(costs.values())
        rows.append(dict(pool=pool, times=times, cost_gap=gap, identity_cost=aot.pairing_cost(images, noise)))
        print(f'pool {pool:5d}: ' + '  '.join(f'{s} {t:7.3f}s' for s, t in times.items())
              + (f'  lap/scipy {times["lap"] / times["scipy"]:.2f}' if {'lap', 'scipy'} <= set(times) else '')
              + f'  cost gap {gap:.1e}', flush=True)
    return rows

#----------------------------------------------------------------------------

def sync(device):
    if torch.device(device).type == 'cuda':
        torch.cuda.synchronize()

def greedy_rounding(values, cols, offsets, num_cols, cost):
    """The alternative to solver 'knn' (entropic OT rounded to a permutation): the same Sinkhorn
    potentials and candidates, then the candidate edges taken greedily in order of their reduced
    cost (distance minus column potential minus the row's best), each when its row and column are
    still free; the rows and columns left over are solved exactly on their dense block."""
    m = len(values)
    reduced = values - offsets[cols]
    order = np.argsort((reduced - reduced.min(axis=1, keepdims=True)).ravel(), kind='stable')
    assign, taken = np.full(m, -1, dtype=np.int64), np.zeros(num_cols, dtype=bool)
    for e in order: # at most m * k steps, each O(1)
        i, j = divmod(int(e), values.shape[1])
        if assign[i] < 0 and not taken[cols[i, j]]:
            assign[i], taken[cols[i, j]] = cols[i, j], True
    left = np.flatnonzero(assign < 0)
    if len(left):
        free = np.flatnonzero(~taken)
        assign[left] = free[aot._solve_scipy(np.asarray(cost(left, free), dtype=np.float64))]
    return assign, len(left)

def time_large(pools, ks, ref_k, exact_max, exact_solvers, device, digits=None):
    """Solvers for large pools against the exact optimum (or, above exact_max, solver 'knn' at
    ref_k): [{pool, solver, seconds, prep, match, unmatched, cost, ref, identity}]. Random 3x32x32
    images in [-1, 1], or pools drawn from `digits` [N, C, H, W]."""
    rows = []
    for pool in pools:
        gen = torch.Generator().manual_seed(pool)
        if digits is None:
            images = torch.rand([pool, 3, 32, 32], generator=gen) * 2 - 1
        else:
            images = digits[torch.randperm(len(digits), generator=gen)[:pool]]
        noise = torch.randn(images.shape, generator=gen).to(device)
        images = images.to(device)
        x, n = images.flatten(1), noise.flatten(1)
        cost = lambda r, c: torch.cdist(x[torch.from_numpy(r).to(device)], n[torch.from_numpy(c).to(device)]).cpu().numpy()
        identity, found = aot.pairing_cost(images, noise), []
        def add(solver, seconds, idx, prep=float('nan'), unmatched=0):
            assert sorted(idx.tolist()) == list(range(pool)), solver # every noise used once
            found.append(dict(pool=pool, solver=solver, seconds=seconds, prep=prep, match=seconds - prep, unmatched=unmatched,
                              cost=aot.pairing_cost(images, noise, torch.as_tensor(idx)), identity=identity))
        for solver in (exact_solvers if pool <= exact_max else []):
            sync(device)
            start = time.perf_counter()
            idx, _ = aot.assign(images, noise, solver=solver)
            add(solver, time.perf_counter() - start, idx.cpu())
        # Solver 'knn' in its steps, the passes shared by every k (each k's seconds count them all).
        sync(device)
        start = time.perf_counter()
        offsets = aot.column_potentials(x, n)
        values, cols = aot.knn_rows(x, n, max(ks + ([ref_k] if pool > exact_max else [])), offsets=offsets)
        prep = time.perf_counter() - start
        reduce = offsets.cpu().numpy() # as solver knn: the matching on costs less the column potentials
        for k in sorted(set(ks + ([ref_k] if pool > exact_max else []))):
            stats, start = {}, time.perf_counter()
            idx = aot.solve_sparse(values[:, :k], cols[:, :k], pool, cost, stats, offsets=reduce)
            add(f'knn k={k}', prep + time.perf_counter() - start, idx, prep, stats['unmatched'])
        stats, start = {}, time.perf_counter() # the same matching on the plain costs: what the reduction saves
        idx = aot.solve_sparse(values[:, :aot.KNN_K], cols[:, :aot.KNN_K], pool, cost, stats)
        add(f'knn k={aot.KNN_K}, costs not reduced', prep + time.perf_counter() - start, idx, prep, stats['unmatched'])
        start = time.perf_counter()
        idx, unmatched = greedy_rounding(values[:, :aot.KNN_K], cols[:, :aot.KNN_K], reduce, pool, cost)
        add(f'sinkhorn-greedy k={aot.KNN_K}', prep + time.perf_counter() - start, idx, prep, unmatched)
        if pool <= exact_max: # plain nearest neighbours (no potentials): why knn_rows takes offsets
            start = time.perf_counter()
            values0, cols0 = aot.knn_rows(x, n, aot.KNN_K)
            prep0 = time.perf_counter() - start
            stats = {}
            idx = aot.solve_sparse(values0, cols0, pool, cost, stats)
            add(f'knn k={aot.KNN_K}, no potentials', time.perf_counter() - start, idx, prep0, stats['unmatched'])
        ref = min(r['cost'] for r in found if r['solver'] in exact_solvers) if pool <= exact_max else \
              next(r['cost'] for r in found if r['solver'] == f'knn k={ref_k}')
        for r in found:
            r['ref'], r['exact'] = ref, pool <= exact_max
            print(f'pool {pool:6d} {r["solver"]:28s} {r["seconds"]:8.2f}s (distance passes {r["prep"]:.2f}s) '
                  f'fallback rows {r["unmatched"]:5d}  cost/{"exact" if r["exact"] else "ref"} '
                  f'{r["cost"] / ref - 1:+.4%}  gain kept {(identity - r["cost"]) / (identity - ref):.4f}', flush=True)
        rows += found
    return rows

#----------------------------------------------------------------------------

def time_builds(pools, classes, repeats, workdir):
    """[{pool, classes, seconds per placement}]: best of `repeats` pools built by PoolStream on random
    3x32x32 images with EDM's CIFAR-10 augmentation (p=0.12), on one CPU thread and on the GPU."""
    devices = ['cpu'] + (['cuda'] if torch.cuda.is_available() else [])
    rows = []
    for c in classes:
        path = make_dataset(os.path.join(workdir, f'build-data-{c}'), n=max(pools), res=32, channels=3, num_classes=c, labels=c > 1)
        dataset = ImageFolderDataset(path, use_labels=c > 1)
        for pool in pools:
            times = {}
            for device in devices:
                threads = torch.get_num_threads()
                torch.set_num_threads(1 if device == 'cpu' else threads) # as in a DataLoader worker
                pipe = AugmentPipe(p=0.12, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)
                stream = PoolStream(dataset, pool, augment_pipe=pipe, device=device)
                stream.make_pool(0) # warm-up: kernels, caches, allocator
                best = float('inf')
                for k in range(1, repeats + 1):
                    start = time.perf_counter()
                    stream.make_pool(k)
                    if device == 'cuda':
                        torch.cuda.synchronize()
                    best = min(best, time.perf_counter() - start)
                torch.set_num_threads(threads)
                times[device] = best
            rows.append(dict(pool=pool, classes=c, times=times))
            print(f'pool {pool:5d}, {c:4d} classes: ' + '  '.join(f'{d} {t:7.3f}s' for d, t in times.items()), flush=True)
    return rows

#----------------------------------------------------------------------------

def read_stats(run_dir):
    """(steady wait fraction, steady sec/kimg, first-tick wait seconds) from a run's stats.jsonl."""
    ticks = [json.loads(line) for line in open(os.path.join(run_dir, 'stats.jsonl'))]
    first, steady = ticks[0], ticks[1:]
    if not steady:
        raise click.ClickException(f'{run_dir}: only one tick; raise --kimg or lower --tick')
    secs = np.array([t['Timing/sec_per_tick']['mean'] for t in steady])
    fracs = np.array([t['Timing/aot_wait_frac']['mean'] for t in steady])
    kimg = np.array([t['Progress/kimg']['mean'] for t in ticks])
    return float((fracs * secs).sum() / secs.sum()), float(secs.sum() / (kimg[-1] - kimg[0])), first['Timing/sec_per_tick']['mean']

def children_cpu():
    # CPU seconds of finished child processes and theirs (train.py and its DataLoader worker).
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime

def run_train(run_dir, data, kimg, tick, args):
    """Run train.py for kimg without snapshots or grids (shared with bench/train_speed.py);
    returns read_stats of the run."""
    cmd = [sys.executable, os.path.join(ROOT, 'train.py'), f'--outdir={run_dir}', '--nosubdir', f'--data={data}',
           f'--duration={kimg / 1000}', f'--tick={tick}', '--snap=100000', '--dump=100000', '--grid=0', '--seed=0', *args]
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        raise click.ClickException(f'train.py failed ({" ".join(cmd)}):\n{proc.stdout[-2000:]}')
    return read_stats(run_dir)

def train_run(data, outdir, pool, workers, solver, kimg, tick, train_args):
    print(f'train.py --aot={pool} --workers={workers} --aot-solver={solver} ...', flush=True)
    start, cpu_start = time.time(), children_cpu()
    wait, sec_per_kimg, first = run_train(os.path.join(outdir, f'aot{pool}-workers{workers}-{solver}'), data, kimg, tick,
        [f'--aot={pool}', f'--aot-solver={solver}', f'--workers={workers}', *train_args.split()])
    cpu_per_kimg = (children_cpu() - cpu_start) / kimg
    print(f'  wall {time.time() - start:.0f}s, steady aot_wait {wait:.1%}, {sec_per_kimg:.1f} sec/kimg, '
          f'{cpu_per_kimg:.1f} CPU s/kimg, first tick {first:.1f}s', flush=True)
    return dict(pool=pool, workers=workers, solver=solver, wait=wait, sec_per_kimg=sec_per_kimg, cpu_per_kimg=cpu_per_kimg)

#----------------------------------------------------------------------------

@click.command()
@click.option('--pools',       help='Pool sizes for the solver timings (empty: skip them)', metavar='LIST', default='256,512,1024,2048,4096', show_default=True)
@click.option('--solvers',     help='Solvers to time  [default: scipy, and lap where it is installed]', metavar='LIST', default=installed_solvers)
@click.option('--repeats',     help='Timings per pool and solver (best is kept)', type=click.IntRange(min=1), default=2, show_default=True)
@click.option('--large-pools', help='Pool sizes for the large-pool solvers (knn, its alternative, exact where it fits)', metavar='LIST', default='512,1024,2048,4096,16384', show_default=True)
@click.option('--skip-large',  help='Skip the large-pool solver part', is_flag=True)
@click.option('--large-ks',    help='k values of solver knn to measure', metavar='LIST', default='8,16,32,64', show_default=True)
@click.option('--exact-max',   help='Largest pool also solved exactly (scipy, lap)', type=int, default=4096, show_default=True)
@click.option('--reference-k', help='Above --exact-max: knn at this k is the reference', type=int, default=128, show_default=True)
@click.option('--device',      help='Device for the large-pool part\'s tensors (distances, potentials)', default='cpu', show_default=True)
@click.option('--large-data',  help='Images of the large-pool part: random 3x32x32, or a dataset (pools drawn from it)', metavar='random|ZIP|DIR', default='random', show_default=True)
@click.option('--builds/--no-builds', help='Time whole pool builds per placement', default=True, show_default=True)
@click.option('--build-pools', help='Pool sizes for the build timings', metavar='LIST', default='512,4096', show_default=True)
@click.option('--build-classes', help='Class counts for the build timings (1 = unconditional)', metavar='LIST', default='1,10', show_default=True)
@click.option('--train/--no-train', help='Also measure the training loop\'s wait', default=True, show_default=True)
@click.option('--train-pools', help='--aot values to train with (0 = plain EDM, the baseline)', metavar='LIST', default='0,512,4096', show_default=True)
@click.option('--workers',     help='--workers values to train with', metavar='LIST', default='1,0', show_default=True)
@click.option('--train-solvers', help='--aot-solver values to train with at the largest pool  [default: scipy, and lap where it is installed]', metavar='LIST', default=installed_solvers)
@click.option('--data',        help='Dataset for the training runs (unconditional; "" = 1024 random 3x32x32 images)', metavar='ZIP|DIR', type=str, default='datasets/uci-digits-16x16.zip', show_default=True)
@click.option('--kimg',        help='Images per training run (thousands); cover a few of the largest pools', type=float, default=12.288, show_default=True)
@click.option('--tick',        help='Tick length (kimg)', type=float, default=2.048, show_default=True)
@click.option('--train-args',  help='Network and batch options for train.py', metavar='STR',
              default='--arch=ddpmpp --cbase=16 --cres=1,2 --batch=64 --augment=0 --dropout=0', show_default=True)
@click.option('--threads',     help='Torch threads here and in train.py (OMP_NUM_THREADS)  [default: torch default]', metavar='INT', type=click.IntRange(min=1))
@click.option('--workdir',     help='Where the dataset and runs go  [default: a temporary directory]', metavar='DIR', type=str)
@click.option('--doc/--no-doc', help='Rewrite the section in docs/benchmarks.md', default=True, show_default=True)
def main(pools, solvers, repeats, large_pools, skip_large, large_ks, exact_max, reference_k, device, large_data, builds, build_pools, build_classes, train, train_pools, workers, train_solvers, data, kimg, tick, train_args, threads, workdir, doc):
    """Time AOT pairing and the training loop's wait for it."""
    if threads is not None:
        torch.set_num_threads(threads)
        os.environ['OMP_NUM_THREADS'] = str(threads) # for the train.py runs
    env = report.machine()
    pools, solvers = parse_list(pools), parse_list(solvers, str)
    for solver in solvers:
        try:
            aot.check_solver(solver)
        except ValueError as err:
            raise click.BadParameter(str(err), param_hint='--solvers')
    print(env)
    lines = ['## AOT pairing cost (`bench/aot_cost.py`)']
    if pools: # --pools= (empty) skips the solver timings and keeps the last ones
        rows = time_assign(pools, solvers, repeats)
        both = {'lap', 'scipy'} <= set(solvers)
        lines += part('solvers', [f'`training.aot.assign` on one pool of random 3x32x32 images and unit noise (best of {repeats}; includes the `torch.cdist` distances).', '',
            '| pool | ' + ' | '.join(f'{s} (s)' for s in solvers) + (' | lap / scipy' if both else '') + ' | relative cost difference |',
            '|---:|' + '---:|' * len(solvers) + ('---:|' if both else '') + '---:|',
            *[f'| {r["pool"]} | ' + ' | '.join(f'{r["times"][s]:.3f}' for s in solvers) + (f' | {r["times"]["lap"] / r["times"]["scipy"]:.2f}' if both else '')
              + f' | {r["cost_gap"]:.1e} |' for r in rows]], env)
    elif doc:
        lines += kept_part('solvers')

    if not skip_large:
        exact = [s for s in solvers if s in aot.DENSE_SOLVERS]
        digits = None
        if large_data != 'random':
            dataset = ImageFolderDataset(os.path.join(ROOT, large_data))
            digits = torch.from_numpy(np.stack([dataset[i][0] for i in range(len(dataset))])).to(torch.float32) / 127.5 - 1
        rows = time_large(parse_list(large_pools), parse_list(large_ks), reference_k, exact_max, exact, device, digits)
        images = 'random 3x32x32 images in [-1, 1]' if digits is None else f'pools drawn from `{large_data}`'
        large = [f'Large pools (`--large-pools`, {images}, unit noise, on {device}): solver `knn` (`training.aot`: {len(aot.KNN_EPS)} chunked Sinkhorn passes '
                  'for the column potentials, one pass for each row\'s k candidates, one copy to the host, then scipy\'s sparse '
                  'exact matching on the costs less the column potentials, the same permutation found faster; "costs not reduced": '
                  'the same matching on the plain costs), its alternative `sinkhorn-greedy` (the same potentials and candidates, rounded to a permutation '
                  'greedily), the plain nearest neighbours without potentials, and the exact solvers '
                  f'up to {exact_max}.' + (f' Above that the reference is `knn` at k={reference_k}, not the exact optimum.' if max(r['pool'] for r in rows) > exact_max else '')
                  + ' The knn rows share '
                  'their distance passes: each row\'s seconds count them once plus its own matching. "fallback rows": rows the sparse '
                  'graph could not match, solved with the columns left over on their dense block. "gain kept": (identity - cost) / '
                  '(identity - reference).', '',
                  '| pool | solver | seconds | of which distance passes | fallback rows | cost vs reference | gain kept |',
                  '|---:|---|---:|---:|---:|---:|---:|']
        for r in rows:
            name = r['solver'] + (' (reference)' if not r['exact'] and r['solver'] == f'knn k={reference_k}' else '')
            prep = '-' if np.isnan(r['prep']) else f'{r["prep"]:.2f}'
            large.append(f'| {r["pool"]} | {name} | {r["seconds"]:.2f} | {prep} | {r["unmatched"]} | '
                         f'{r["cost"] / r["ref"] - 1:+.3%} | {(r["identity"] - r["cost"]) / (r["identity"] - r["ref"]):.4f} |')
        # One part per kind of images: a run on the digits keeps the random images' part, and back.
        name = 'large' if digits is None else f'large-{os.path.splitext(os.path.basename(large_data))[0]}'
        lines += part(name, large, env) + (kept_part('large*', [name]) if doc else [])
    elif doc:
        lines += kept_part('large*')

    if workdir:
        os.makedirs(workdir, exist_ok=True)
    if builds:
        with tempfile.TemporaryDirectory(dir=workdir) as tmp:
            rows = time_builds(parse_list(build_pools), parse_list(build_classes), repeats, tmp)
        devices = list(rows[0]['times'])
        lines += part('builds', [f'One whole pool built by `training.pools.PoolStream` (random 3x32x32 images, EDM\'s augmentation at p=0.12, '
                  f'noise, distances, scipy\'s assignment; best of {repeats} after a warm-up): on one CPU thread as a pool worker '
                  'process builds it (`--workers N`)' + (', and on the GPU as the in-process builder does (`--workers 0`)' if 'cuda' in devices else '') + '.', '',
                  '| pool | classes | ' + ' | '.join('worker, 1 CPU thread (s)' if d == 'cpu' else 'in-process, GPU (s)' for d in devices) + ' |',
                  '|---:|---:|' + '---:|' * len(devices),
            *[f'| {r["pool"]} | {r["classes"]} | ' + ' | '.join(f'{r["times"][d]:.3f}' for d in devices) + ' |' for r in rows]], env)
    elif doc:
        lines += kept_part('builds')

    if train:
        with tempfile.TemporaryDirectory(dir=workdir) as tmp:
            data_desc = f'`{data}`' if data else '1024 random 32x32 RGB images'
            data = os.path.join(ROOT, data) if data else make_dataset(os.path.join(tmp, 'data'), n=1024, res=32, channels=3, labels=False)
            runs = []
            for w in parse_list(workers):
                runs.append(train_run(data, tmp, 0, w, 'scipy', kimg, tick, train_args))
                sizes = [p for p in parse_list(train_pools) if p > 0]
                for pool in sizes: # every solver at the largest pool, the default one below it
                    for solver in (parse_list(train_solvers, str) if pool == max(sizes) else ['scipy']):
                        runs.append(train_run(data, tmp, pool, w, solver, kimg, tick, train_args))
        base = {r['workers']: r['cpu_per_kimg'] for r in runs if r['pool'] == 0}
        lines += part('train', [f'Training wait: `train.py {train_args}` on {data_desc} (unconditional), {kimg:g} kimg per run, '
                  f'steady state (ticks of {tick:g} kimg after the first; the first pool is always waited for). '
                  'aot_wait and wall sec/kimg are from stats.jsonl; CPU s/kimg is the CPU time of the whole run, trainer and '
                  'pool worker, start-up included: unlike wall time it is not inflated by other programs on a shared machine.', '',
                  '| --aot | --aot-solver | --workers | aot_wait | wall sec/kimg | CPU s/kimg | CPU vs --aot 0 |', '|---:|---|---:|---:|---:|---:|---:|',
            *[f'| {r["pool"]} | {r["solver"] if r["pool"] else "-"} | {r["workers"]} | {r["wait"]:.1%} | '
              f'{r["sec_per_kimg"]:.1f} | {r["cpu_per_kimg"]:.1f} | {r["cpu_per_kimg"] / base[r["workers"]]:.2f} |' for r in runs]], env)
    elif doc:
        lines += kept_part('train')
    print('\n'.join(lines))
    if doc:
        report.update_section('aot_cost', '\n'.join(lines), env)

if __name__ == '__main__':
    main()
