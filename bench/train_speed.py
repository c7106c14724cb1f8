"""Training throughput of the numeric modes and pool placements, one after another on this device.

Runs train.py once per configuration on the same data and settings and prints steady-state sec/kimg
(ticks after the first, so start-up and torch.compile's compilation are left out), aot_wait (the
slowest rank's share of the tick spent waiting for a pool) and the speed relative to `default`
(EDM's exact fp32 numerics, default pool placement), with the device's name.

    python bench/train_speed.py                                   # EDM's CIFAR-10 DDPM++ settings, on random 32x32 data
    python bench/train_speed.py --configs=default,bf16 --train-args='--arch=ddpmpp --cbase=16 --cres=1,2 --batch=32' \\
        --kimg=0.256 --tick=0.064 --no-doc                         # CPU smoke test
    python bench/train_speed.py --configs=aot0,aot64,default,nearest4,nearest16 ...    # the couplings: docs/training-speed.md
"""

import os
import tempfile
import time

import click

from bench import report
from bench.aot_cost import run_train
from training.testdata import make_dataset


# name: extra train.py options. 'default' is the baseline of the ratios.
CONFIGS = {
    'aot0':     ['--aot=0'],                       # plain EDM noise, same loop
    'aot64':    ['--aot=64'],                      # in-batch assignment where the per-GPU batch is 64
    'nearest4': ['--aot=0', '--nearest-of=4'],     # nearest of 4 noises per image
    'nearest16': ['--aot=0', '--nearest-of=16'],
    'default':  [],                                # --aot from --train-args, --workers auto, EDM's numerics
    'workers0': ['--workers=0'],                   # pools on the training device, solver in the background
    'workers1': ['--workers=1'],                   # pools in one CPU worker process
    'workers4': ['--workers=4'],
    'tf32':     ['--tf32'],
    'bf16':     ['--bf16'],
    'fast':     ['--tf32', '--bf16', '--compile'],
}

def train_run(name, data, outdir, kimg, tick, train_args):
    args = [*train_args.split(), *CONFIGS[name]]
    print(f'{name}: train.py {" ".join(args)}', flush=True)
    start = time.time()
    wait, sec_per_kimg, first = run_train(os.path.join(outdir, name), data, kimg, tick, args)
    print(f'  {sec_per_kimg:.2f} sec/kimg, aot_wait {wait:.1%}, first tick {first:.1f}s, wall {time.time() - start:.0f}s', flush=True)
    return dict(name=name, wait=wait, sec_per_kimg=sec_per_kimg, first=first)

@click.command()
@click.option('--configs',    help=f'Configurations to run, in order ({", ".join(CONFIGS)})', metavar='LIST', default='aot0,default,workers0,workers1,tf32,bf16,fast', show_default=True)
@click.option('--data',       help='Dataset ("" = 2048 random 3x32x32 images)', metavar='ZIP|DIR', type=str, default='', show_default=True)
@click.option('--train-args', help='train.py options shared by all runs', metavar='STR',
              default='--arch=ddpmpp --batch=64 --augment=0.12 --aot=512 --cond=0', show_default=True)
@click.option('--kimg',       help='Images per run (thousands)', type=click.FloatRange(min=0, min_open=True), default=20.48, show_default=True)
@click.option('--tick',       help='Tick length (kimg); ticks after the first are timed', type=click.FloatRange(min=0, min_open=True), default=4.096, show_default=True)
@click.option('--threads',    help='OMP_NUM_THREADS for the runs  [default: torch default]', metavar='INT', type=click.IntRange(min=1))
@click.option('--workdir',    help='Where the dataset and runs go  [default: a temporary directory]', metavar='DIR', type=str)
@click.option('--doc/--no-doc', help='Rewrite the section in docs/benchmarks.md', default=True, show_default=True)
def main(configs, data, train_args, kimg, tick, threads, workdir, doc):
    """Time training in each numeric mode and pool placement, side by side."""
    names = [n for n in configs.split(',') if n]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown or 'default' not in names:
        raise click.BadParameter(f'choose from {", ".join(CONFIGS)}, including default (the baseline)', param_hint='--configs')
    if threads is not None:
        os.environ['OMP_NUM_THREADS'] = str(threads)
    env = report.machine()
    print(env, flush=True)
    if workdir:
        os.makedirs(workdir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        data_desc = f'`{data}`' if data else '2048 random 3x32x32 images'
        data = os.path.abspath(data) if data else make_dataset(os.path.join(tmp, 'data'), n=2048, res=32, labels=False)
        runs = [train_run(name, data, tmp, kimg, tick, train_args) for name in names]
    base = next(r for r in runs if r['name'] == 'default')['sec_per_kimg']
    lines = ['## Training speed (`bench/train_speed.py`)', '',
             f'`train.py {train_args}` on {data_desc}, {kimg:g} kimg per run; steady state = ticks of {tick:g} kimg after the '
             'first (start-up and compilation excluded). speed = default sec/kimg / this sec/kimg.', '',
             '| config | extra options | sec/kimg | aot_wait | speed vs default | first tick (s) |', '|---|---|---:|---:|---:|---:|']
    for r in runs:
        lines.append(f'| {r["name"]} | {" ".join(CONFIGS[r["name"]]) or "-"} | {r["sec_per_kimg"]:.2f} | {r["wait"]:.1%} | '
                     f'{base / r["sec_per_kimg"]:.2f}x | {r["first"]:.1f} |')
    print('\n'.join(lines))
    if doc:
        report.update_section('train_speed', '\n'.join(lines), env)

if __name__ == '__main__':
    main()
