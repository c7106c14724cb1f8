"""FD-digits with and without Discriminator Guidance: one network, several discriminators.

Reuses bench/digits_fd.py's measure (a digit classifier trained here, FD in its features and in
pixel space); every method samples the same seeds with EDM's Heun sampler.

    python bench/dg_study.py --data=datasets/uci-digits-16x16.zip --network=aot.pkl \\
        --dg=dg/discriminator.safetensors --name=DG --dg=dg-aot/discriminator.safetensors --name=DG-AOT \\
        --dg-weight=2 --seeds=0-499 --nfe=7,11,15,19,27,35 --out=out/dg
"""

import json
import os
import sys
import warnings

import click
import numpy as np
import scipy.linalg
import torch
import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.digits_fd import load_digits, train_classifier, frechet
from training import guidance, sampling
from training.images import to_uint8, save_image_grid
from training.network_io import load_network
from tools.trajectory import heun_steps, parse_int_list, pyplot

def plot(result, path):
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), dpi=120)
    for ax, key, title in zip(axes, ('fd_digits', 'fd_pixels'), ('FD in digit-classifier features', 'FD in pixel space')):
        for method, rows in result['methods'].items():
            ax.plot([r['nfe'] for r in rows], [r[key] for r in rows], 'o-', label=method)
        ax.set_xlabel('NFE (Heun)'); ax.set_ylabel('Frechet distance'); ax.set_yscale('log'); ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, which='both'); ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)

def merge(paths, out):
    """One table and plot from several runs of this script (same data, seeds and NFE)."""
    results = [json.load(open(p)) for p in paths]
    merged = dict(settings=[r['settings'] for r in results], methods={k: v for r in results for k, v in r['methods'].items()})
    with open(out + '.json', 'w') as f:
        json.dump(merged, f, indent=1)
    plot(merged, out + '.png')
    for method, rows in merged['methods'].items():
        print(f'{method:>12}: ' + '  '.join(f'NFE {r["nfe"]} {r["fd_digits"]:.2f} / {r["fd_pixels"]:.3f}' for r in rows))

@click.command()
@click.option('--data',      help='Labelled digits dataset', metavar='ZIP|DIR', type=str)
@click.option('--network',   help='Network to guide', metavar='PATH', type=str)
@click.option('--dg', 'dgs', help='Discriminator (train_discriminator.py); repeat to compare', metavar='PATH', multiple=True)
@click.option('--name', 'names', help='Label of each --dg', metavar='STR', multiple=True)
@click.option('--dg-weight', help='DG weight (first order)', metavar='FLOAT', type=float, default=2.0, show_default=True)
@click.option('--seeds',     help='Seeds', metavar='LIST', default='0-499', show_default=True)
@click.option('--nfe',       help='Heun NFE budgets (odd)', metavar='LIST', default='7,11,15,19,27,35', show_default=True)
@click.option('--rho',       help='Time step exponent', metavar='FLOAT', type=float, default=7, show_default=True)
@click.option('--batch',     help='Images per sampler call', metavar='INT', type=int, default=250, show_default=True)
@click.option('--baseline/--no-baseline', help='Also sample without guidance', default=True, show_default=True)
@click.option('--merge', 'merge_paths', help='Only merge these PREFIX.json of earlier runs into --out', metavar='LIST', type=str)
@click.option('--out',       help='Output prefix: PREFIX.json, PREFIX.png, PREFIX-samples.png', metavar='PATH', type=str, required=True)
@torch.no_grad() # scoped to main(), not process-wide: callers that import main() keep autograd
def main(data, network, dgs, names, dg_weight, seeds, nfe, rho, batch, baseline, merge_paths, out):
    """FD-digits per NFE for no guidance and each discriminator."""
    if merge_paths:
        return merge(merge_paths.split(','), out)
    if not (data and network):
        raise click.UsageError('--data and --network are needed (unless --merge)')
    seeds, nfes = parse_int_list(seeds, 'seed'), sorted(set(parse_int_list(nfe, 'NFE')))
    names = list(names) or [os.path.basename(os.path.dirname(p)) for p in dgs]
    if len(names) != len(dgs):
        raise click.BadParameter('give one --name per --dg', param_hint='--name')
    warnings.filterwarnings('ignore', category=scipy.linalg.LinAlgWarning)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)

    images, labels = load_digits(data)
    with torch.enable_grad():
        classifier, accuracy, _ = train_classifier(images, labels)
    real_feat, real_pix = classifier.features(images), images.flatten(1)
    net = load_network(network)
    methods = {'no guidance': None} if baseline else {}
    for name, path in zip(names, dgs):
        disc = guidance.load_discriminator(path)
        problem = guidance.incompatibility(disc, net)
        if problem:
            raise click.ClickException(f'{path}: {problem}')
        methods[name] = guidance.DiscriminatorGuidance(disc)
    result = dict(settings=dict(data=data, network=network, seeds=[seeds[0], seeds[-1]], nfe=nfes, rho=rho, dg_weight=dg_weight,
                                classifier_accuracy=accuracy, discriminators=dict(zip(names, dgs))), methods={})
    grid = []
    for method, dg in methods.items():
        rows = []
        for n in nfes:
            samples = []
            for chunk in tqdm.tqdm([seeds[i:i + batch] for i in range(0, len(seeds), batch)], desc=f'{method} NFE {n}', unit='batch'):
                latents, class_labels, rnd = sampling.latents_for_seeds(net, chunk)
                kwargs = dict(guidance=dg, dg_weight=dg_weight) if dg is not None else {}
                x = sampling.edm_sampler(sampling.MinBatchNet(net), latents, class_labels, randn_like=rnd.randn_like, num_steps=heun_steps(n), rho=rho, **kwargs)
                samples.append(torch.as_tensor(to_uint8(x)).permute(0, 3, 1, 2).float() / 127.5 - 1)
            samples = torch.cat(samples)
            rows.append(dict(nfe=n, fd_digits=frechet(classifier.features(samples), real_feat), fd_pixels=frechet(samples.flatten(1), real_pix)))
            print(f'{method} NFE {n:3d}: FD-digits {rows[-1]["fd_digits"]:.3f}  FD-pixels {rows[-1]["fd_pixels"]:.3f}', flush=True)
            if n == nfes[-1]:
                grid.append(to_uint8(samples[:16]))
        result['methods'][method] = rows
        with open(out + '.json', 'w') as f: # after each method, so a stopped run keeps what it measured
            json.dump(result, f, indent=1)
    save_image_grid(np.concatenate(grid), f'{out}-samples.png', cols=16)

    plot(result, out + '.png')
    print(f'Wrote {out}.json, {out}.png, {out}-samples.png')

if __name__ == '__main__':
    main()
