"""How much closer a larger AOT pool pairs: mean image-noise distance after pairing versus pool size.

For each pool size P, pools of P images are paired with P unit-normal noises by training.aot.assign
(exact assignment with --exact-solver up to --exact-max, solver 'knn' above) and the mean distance
is compared with the identity (random) pairing of the same pool: relative decrease
1 - cost(paired) / cost(identity). Two kinds of images:

  random   uniform in [-1, 1], 3x32x32 (CIFAR-like dimension, no structure)
  digits   the bundled datasets/uci-digits-16x16.zip (1,797 images, 1x16x16), pools drawn without
           replacement (the largest pool is the whole set; each draw has new noise)

Results are kept in a JSON file (one entry per data, size and draw), so large sizes can be added by
a later run; the table and the plot are made from everything in it.

    python bench/aot_pool_size.py                                  # default sizes, table + plot
    python bench/aot_pool_size.py --random-sizes=65536 --digits-sizes= --draws=1   # add one size
"""

import json
import os
import time

import click
import numpy as np
import torch

from training import aot
from training.dataset import ImageFolderDataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def parse_list(text):
    return [int(x) for x in text.split(',') if x.strip()]

def load_digits(path):
    dataset = ImageFolderDataset(path)
    return torch.from_numpy(np.stack([dataset[i][0] for i in range(len(dataset))])).to(torch.float32) / 127.5 - 1

def draws_for(size, draws):
    # Several draws where they are cheap; one for the pools that take minutes.
    return draws if size <= 4096 else 1

def measure(kind, size, draw, digits, exact_max, exact_solver, device):
    gen = torch.Generator().manual_seed(1000 * draw + size)
    if kind == 'random':
        images = torch.rand([size, 3, 32, 32], generator=gen) * 2 - 1
    else:
        images = digits[torch.randperm(len(digits), generator=gen)[:size]]
    noise = torch.randn(images.shape, generator=gen)
    images, noise = images.to(device), noise.to(device)
    solver = exact_solver if size <= exact_max else 'knn'
    start = time.perf_counter()
    idx, _ = aot.assign(images, noise, solver=solver)
    seconds = time.perf_counter() - start
    identity, paired = aot.pairing_cost(images, noise), aot.pairing_cost(images, noise, idx)
    return dict(kind=kind, size=size, draw=draw, solver=solver, seconds=seconds,
                identity=identity / size, paired=paired / size, decrease=1 - paired / identity)

def summary(results):
    """{kind: [(size, mean decrease, std, draws, mean distance identity, paired, solver)]}."""
    out = {}
    for kind in sorted({r['kind'] for r in results}):
        rows = []
        for size in sorted({r['size'] for r in results if r['kind'] == kind}):
            rs = [r for r in results if r['kind'] == kind and r['size'] == size]
            dec = np.array([r['decrease'] for r in rs])
            rows.append((size, dec.mean(), dec.std(ddof=1) if len(dec) > 1 else float('nan'), len(rs),
                         np.mean([r['identity'] for r in rs]), np.mean([r['paired'] for r in rs]), '/'.join(sorted({r['solver'] for r in rs}))))
        out[kind] = rows
    return out

def table(summ):
    lines = ['| images | pool | draws | mean distance, identity | mean distance, paired | relative decrease | solver |',
             '|---|---:|---:|---:|---:|---:|---|']
    for kind, rows in summ.items():
        for size, mean, std, n, ident, paired, solver in rows:
            spread = f' ± {std:.2%}' if n > 1 else ''
            lines.append(f'| {kind} | {size} | {n} | {ident:.3f} | {paired:.3f} | {mean:.2%}{spread} | {solver} |')
    return '\n'.join(lines)

def plot(summ, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    labels = {'random': 'random 3x32x32 in [-1, 1]', 'digits': 'UCI digits 1x16x16 (1,797 images)'}
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for kind, rows in summ.items():
        size, mean, std = (np.array([r[i] for r in rows]) for i in range(3))
        ax.errorbar(size, 100 * mean, yerr=100 * np.nan_to_num(std), marker='o', capsize=3, label=labels.get(kind, kind))
    ax.set_xscale('log', base=2)
    ax.set_xlabel('pool size P (images = noises per assignment)')
    ax.set_ylabel('mean image-noise distance\ndecrease vs random pairing (%)')
    ax.set_title('AOT: how much closer a larger pool pairs')
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    print(f'Wrote {path}')

@click.command()
@click.option('--random-sizes', help='Pool sizes for random 3x32x32 images', metavar='LIST',
              default='64,128,256,512,1024,2048,4096,8192,16384', show_default=True)
@click.option('--digits-sizes', help='Pool sizes for the digits (at most the dataset size)', metavar='LIST',
              default='64,128,256,512,1024,1797', show_default=True)
@click.option('--draws', help='Draws per size up to 4,096 (one above)', type=click.IntRange(min=1), default=5, show_default=True)
@click.option('--exact-max', help='Largest pool solved exactly; solver knn above', type=int, default=4096, show_default=True)
@click.option('--exact-solver', help='Exact solver', type=click.Choice(list(aot.DENSE_SOLVERS)), default='lap', show_default=True)
@click.option('--data', help='Digits dataset', metavar='ZIP', default='datasets/uci-digits-16x16.zip', show_default=True)
@click.option('--json', 'json_path', help='Results file (read, extended, rewritten; keep it to add sizes later)', metavar='FILE', default='out/aot-pool-size.json', show_default=True)
@click.option('--png', help='Plot', metavar='FILE', default='docs/figures/aot-pool-size.png', show_default=True)
@click.option('--device', help='Device for the distances', default='cpu', show_default=True)
def main(random_sizes, digits_sizes, draws, exact_max, exact_solver, data, json_path, png, device):
    """Mean image-noise distance after AOT pairing versus pool size."""
    aot.check_solver(exact_solver)
    json_path, png = os.path.join(ROOT, json_path), os.path.join(ROOT, png)
    os.makedirs(os.path.dirname(json_path), exist_ok=True)
    results = json.load(open(json_path)) if os.path.isfile(json_path) else []
    digits = load_digits(os.path.join(ROOT, data)) if parse_list(digits_sizes) else None
    for kind, sizes in (('random', parse_list(random_sizes)), ('digits', parse_list(digits_sizes))):
        for size in sizes:
            if kind == 'digits' and size > len(digits):
                raise click.BadParameter(f'{size} > {len(digits)} digits', param_hint='--digits-sizes')
            for draw in range(draws_for(size, draws)):
                r = measure(kind, size, draw, digits, exact_max, exact_solver, device)
                results = [o for o in results if (o['kind'], o['size'], o['draw']) != (kind, size, draw)] + [r]
                print(f'{kind:6s} P={size:6d} draw {draw}: {r["solver"]} {r["seconds"]:8.2f}s  decrease {r["decrease"]:.3%}', flush=True)
                with open(json_path, 'w') as f: # after every pool: a long run keeps what it measured
                    json.dump(sorted(results, key=lambda o: (o['kind'], o['size'], o['draw'])), f, indent=1)
    summ = summary(results)
    print(table(summ))
    plot(summ, png)

if __name__ == '__main__':
    main()
