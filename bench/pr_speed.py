"""CPU time of fid.py's precision/recall (compute_precision_recall, k=3) on random features.

    python bench/pr_speed.py --num=5000 --dim=2048 --threads=1
"""

import time

import click
import torch

from bench import report
from metrics import fid

@click.command()
@click.option('--num',     help='Features per set', metavar='INT', type=click.IntRange(min=4), default=5000, show_default=True)
@click.option('--dim',     help='Feature dimension', metavar='INT', type=click.IntRange(min=1), default=2048, show_default=True)
@click.option('--rounds',  help='Timing rounds (best kept)', metavar='INT', type=click.IntRange(min=1), default=3, show_default=True)
@click.option('--threads', help='Torch threads', metavar='INT', type=click.IntRange(min=1), default=1, show_default=True)
def main(num, dim, rounds, threads):
    torch.set_num_threads(threads)
    env = report.machine()
    g = torch.Generator().manual_seed(0)
    real, gen = torch.randn([num, dim], generator=g), torch.randn([num, dim], generator=g)
    times = []
    for _ in range(rounds):
        start = time.process_time()
        fid.compute_precision_recall(real, gen)
        times.append(time.process_time() - start)
    print(f'{num} x {num}, {dim}-d: best {min(times):.2f} CPU s of {rounds} ({", ".join(f"{t:.2f}" for t in times)}); {env}')

if __name__ == '__main__':
    main()
