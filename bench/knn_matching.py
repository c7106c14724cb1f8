"""Solver knn's host matching at large pools: scipy's LAPJVsp on the plain costs against the costs
less the column potentials (what aot.solve_knn does), side by side on the same candidate graphs.

The distance passes of a pool of 65,536 x 3,072 take hours on a CPU, so, as in docs/aot-scale.md,
the graphs come from a stand-in of the same size and a smaller dimension (random 3x8x8 images in
[-1, 1] and unit noise by default). Both matchings are timed on one thread, alternating, and must
find permutations of the same cost.

    python bench/knn_matching.py --pools=16384,65536
"""

import statistics
import time

import click
import numpy as np
import torch

from bench import report
from training import aot

@click.command()
@click.option('--pools',  help='Pool sizes, comma-separated', metavar='LIST', type=str, default='4096,16384', show_default=True)
@click.option('--dim',    help='Values per image of the stand-in', metavar='INT', type=click.IntRange(min=1), default=192, show_default=True)
@click.option('--k',      help='Candidates per image (aot.KNN_K)', metavar='INT', type=click.IntRange(min=1), default=aot.KNN_K, show_default=True)
@click.option('--rounds', help='Timings of each matching (medians reported)', metavar='INT', type=click.IntRange(min=1), default=3, show_default=True)
def main(pools, dim, k, rounds):
    """Time knn's sparse matching with and without the column potentials subtracted."""
    torch.set_num_threads(1)
    print(report.machine())
    lines = [f'| pool | plain costs (s) | less column potentials (s) | speed-up | same cost |', '|---:|---:|---:|---:|---|']
    for pool in [int(p) for p in pools.split(',')]:
        gen = torch.Generator().manual_seed(pool)
        x, n = torch.rand([pool, dim], generator=gen) * 2 - 1, torch.randn([pool, dim], generator=gen)
        start = time.perf_counter()
        offsets = aot.column_potentials(x, n)
        values, cols = aot.knn_rows(x, n, k, offsets=offsets)
        print(f'pool {pool}: distance passes {time.perf_counter() - start:.1f} s', flush=True)
        times, found = {'plain': [], 'reduced': []}, {}
        for _ in range(rounds):
            for name, extra in [('plain', {}), ('reduced', dict(offsets=offsets.numpy()))]:
                start = time.process_time()
                found[name] = aot.solve_sparse(values, cols, pool, **extra)
                times[name].append(time.process_time() - start)
        cost = {name: aot.pairing_cost(x, n, torch.from_numpy(idx)) for name, idx in found.items()}
        plain, reduced = statistics.median(times['plain']), statistics.median(times['reduced'])
        same = np.isclose(cost['plain'], cost['reduced'], rtol=1e-6, atol=0)
        lines.append(f'| {pool:,} | {plain:.2f} | {reduced:.2f} | {plain / reduced:.1f}x | {"yes" if same else "NO: %.6g vs %.6g" % (cost["plain"], cost["reduced"])} |')
        print(lines[-1], flush=True)
    print(f'\nStand-in: random {dim}-value images in [-1, 1], unit noise, k = {k}; medians of {rounds} alternating rounds of CPU time, one thread.\n')
    print('\n'.join(lines))

if __name__ == '__main__':
    main()
