"""What AOT pairing costs: solver time per pool, and how long training waits for its pools.

1. assign() on random 3x32x32 images and unit noise at each pool size, for every solver
   (scipy's linear_sum_assignment, lap's LAPJV), with the ratio lap/scipy and a check that both
   give pairings of the same cost.
2. One pool built by training.pools.PoolStream (loading, EDM's augmentation at p=0.12, noise,
   distances, scipy's assignment) at each --build-pools size and class count: seconds on one CPU
   thread, as a DataLoader worker builds it (--workers N), and, where CUDA is present, on the GPU
   as the in-process builder does (--workers 0).
3. train.py on one small config (default: the bundled digits, unconditional, a small DDPM++) at --aot 0 and each --train-pools size, with the pools prepared in a
   DataLoader worker (--workers 1) and in the training process (--workers 0): the fraction of the
   wall time the loop spent waiting for a pool (stats.jsonl 'Timing/aot_wait_frac', steady state =
   ticks after the first) and sec/kimg relative to --aot 0.

    python bench/aot_cost.py                       # both parts, rewrites its section of docs/benchmarks.md
    python bench/aot_cost.py --no-train            # solver and pool build timings only
"""

import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import click
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import report
from training import aot
from training.augment import AugmentPipe
from training.dataset import ImageFolderDataset
from training.pools import PoolStream
from tests.datagen import make_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def parse_list(text, cast=int):
    return [cast(x) for x in text.split(',') if x.strip()]

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
                idx = aot.assign(images, noise, solver=solver)
                best = min(best, time.perf_counter() - start)
            times[solver], costs[solver] = best, aot.pairing_cost(images, noise, idx)
        gap = (max(costs.values()) - min(costs.values())) / min(costs.values())
        rows.append(dict(pool=pool, times=times, cost_gap=gap, identity_cost=aot.pairing_cost(images, noise)))
        print(f'pool {pool:5d}: ' + '  '.join(f'{s} {t:7.3f}s' for s, t in times.items())
              + (f'  lap/scipy {times["lap"] / times["scipy"]:.2f}' if {'lap', 'scipy'} <= set(times) else '')
              + f'  cost gap {gap:.1e}', flush=True)
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
@click.option('--pools',       help='Pool sizes for the solver timings', metavar='LIST', default='256,512,1024,2048,4096', show_default=True)
@click.option('--solvers',     help='Solvers to time', metavar='LIST', default='scipy,lap', show_default=True)
@click.option('--repeats',     help='Timings per pool and solver (best is kept)', type=click.IntRange(min=1), default=2, show_default=True)
@click.option('--builds/--no-builds', help='Time whole pool builds per placement', default=True, show_default=True)
@click.option('--build-pools', help='Pool sizes for the build timings', metavar='LIST', default='512,4096', show_default=True)
@click.option('--build-classes', help='Class counts for the build timings (1 = unconditional)', metavar='LIST', default='1,10', show_default=True)
@click.option('--train/--no-train', help='Also measure the training loop\'s wait', default=True, show_default=True)
@click.option('--train-pools', help='--aot values to train with (0 = plain EDM, the baseline)', metavar='LIST', default='0,512,4096', show_default=True)
@click.option('--workers',     help='--workers values to train with', metavar='LIST', default='1,0', show_default=True)
@click.option('--train-solvers', help='--aot-solver values to train with at the largest pool', metavar='LIST', default='scipy,lap', show_default=True)
@click.option('--data',        help='Dataset for the training runs (unconditional; "" = 1024 random 3x32x32 images)', metavar='ZIP|DIR', type=str, default='datasets/uci-digits-16x16.zip', show_default=True)
@click.option('--kimg',        help='Images per training run (thousands); cover a few of the largest pools', type=float, default=12.288, show_default=True)
@click.option('--tick',        help='Tick length (kimg)', type=float, default=2.048, show_default=True)
@click.option('--train-args',  help='Network and batch options for train.py', metavar='STR',
              default='--arch=ddpmpp --cbase=16 --cres=1,2 --batch=64 --augment=0 --dropout=0', show_default=True)
@click.option('--threads',     help='Torch threads here and in train.py (OMP_NUM_THREADS)  [default: torch default]', metavar='INT', type=click.IntRange(min=1))
@click.option('--workdir',     help='Where the dataset and runs go  [default: a temporary directory]', metavar='DIR', type=str)
@click.option('--doc/--no-doc', help='Rewrite the section in docs/benchmarks.md', default=True, show_default=True)
def main(pools, solvers, repeats, builds, build_pools, build_classes, train, train_pools, workers, train_solvers, data, kimg, tick, train_args, threads, workdir, doc):
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
    rows = time_assign(pools, solvers, repeats)

    lines = ['## AOT pairing cost (`bench/aot_cost.py`)', '',
             f'`training.aot.assign` on one pool of random 3x32x32 images and unit noise (best of {repeats}; includes the `torch.cdist` distances).', '',
             '| pool | ' + ' | '.join(f'{s} (s)' for s in solvers) + (' | lap / scipy' if {'lap', 'scipy'} <= set(solvers) else '') + ' | relative cost difference |',
             '|---:|' + '---:|' * len(solvers) + ('---:|' if {'lap', 'scipy'} <= set(solvers) else '') + '---:|']
    for r in rows:
        ratio = f' | {r["times"]["lap"] / r["times"]["scipy"]:.2f}' if {'lap', 'scipy'} <= set(solvers) else ''
        lines.append(f'| {r["pool"]} | ' + ' | '.join(f'{r["times"][s]:.3f}' for s in solvers) + ratio + f' | {r["cost_gap"]:.1e} |')

    if workdir:
        os.makedirs(workdir, exist_ok=True)
    if builds:
        with tempfile.TemporaryDirectory(dir=workdir) as tmp:
            rows = time_builds(parse_list(build_pools), parse_list(build_classes), repeats, tmp)
        devices = list(rows[0]['times'])
        lines += ['', f'One whole pool built by `training.pools.PoolStream` (random 3x32x32 images, EDM\'s augmentation at p=0.12, '
                  f'noise, distances, scipy\'s assignment; best of {repeats} after a warm-up): on one CPU thread as a pool worker '
                  'process builds it (`--workers N`)' + (', and on the GPU as the in-process builder does (`--workers 0`)' if 'cuda' in devices else '') + '.', '',
                  '| pool | classes | ' + ' | '.join('worker, 1 CPU thread (s)' if d == 'cpu' else 'in-process, GPU (s)' for d in devices) + ' |',
                  '|---:|---:|' + '---:|' * len(devices)]
        for r in rows:
            lines.append(f'| {r["pool"]} | {r["classes"]} | ' + ' | '.join(f'{r["times"][d]:.3f}' for d in devices) + ' |')

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
        lines += ['', f'Training wait: `train.py {train_args}` on {data_desc} (unconditional), {kimg:g} kimg per run, '
                  f'steady state (ticks of {tick:g} kimg after the first; the first pool is always waited for). '
                  'aot_wait and wall sec/kimg are from stats.jsonl; CPU s/kimg is the CPU time of the whole run, trainer and '
                  'pool worker, start-up included: unlike wall time it is not inflated by other programs on a shared machine.', '',
                  '| --aot | --aot-solver | --workers | aot_wait | wall sec/kimg | CPU s/kimg | CPU vs --aot 0 |', '|---:|---|---:|---:|---:|---:|---:|']
        for r in runs:
            lines.append(f'| {r["pool"]} | {r["solver"] if r["pool"] else "-"} | {r["workers"]} | {r["wait"]:.1%} | '
                         f'{r["sec_per_kimg"]:.1f} | {r["cpu_per_kimg"]:.1f} | {r["cpu_per_kimg"] / base[r["workers"]]:.2f} |')
    print('\n'.join(lines))
    if doc:
        report.update_section('aot_cost', '\n'.join(lines), env)

if __name__ == '__main__':
    main()
