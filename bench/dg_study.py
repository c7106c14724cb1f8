"""FD-digits with and without Discriminator Guidance: one network, several discriminators.

Reuses bench/digits_fd.py's measure (a digit classifier trained here, FD in its features and in
pixel space); every method samples the same seeds with EDM's Heun sampler.

    python bench/dg_study.py --data=datasets/uci-digits-16x16.zip --network=aot.pkl \\
        --dg=dg/discriminator.safetensors --name=DG --dg=dg-aot/discriminator.safetensors --name=DG-AOT \\
        --dg-weight=0.5,2 --seeds=0-399 --draws=2 --nfe=7,11,15,19,27,35 --out=out/dg
"""

import json
import os
import warnings

import click
import numpy as np
import scipy.linalg
import torch
import tqdm

from bench.digits_fd import load_digits, train_classifier, frechet, quantize
from training import guidance
from sampling.denoisers import MinBatchNet
from sampling.edm import edm_sampler
from sampling.guidance import DiscriminatorGuidance, guided_edm_sampler
from sampling.seeds import latents_for_seeds
from sampling.images import to_uint8, save_image_grid
from training.network_io import load_network
from tools.trajectory import heun_steps, parse_int_list, pyplot

def plot(result, path):
    """Left: FD-digits per NFE, one line per method (the mean over the seed draws, bars from the best
    to the worst draw). Right: each method's change against no guidance on the same seeds (paired,
    so far less noisy than the spread between draws), or FD-pixels when there is no baseline."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), dpi=120)
    base = result['methods'].get('no guidance')
    draws = lambda rows, key: np.array([r[key] for r in rows], dtype=float).reshape(len(rows), -1)
    for method, rows in result['methods'].items():
        nfe, v = [r['nfe'] for r in rows], draws(rows, 'fd_digits')
        mean = v.mean(1)
        line = axes[0].errorbar(nfe, mean, yerr=[mean - v.min(1), v.max(1) - mean], fmt='o-', capsize=3, label=method)
        if base is None:
            axes[1].plot(nfe, draws(rows, 'fd_pixels').mean(1), 'o-', color=line[0].get_color(), label=method)
        elif method != 'no guidance':
            delta = v - draws(base, 'fd_digits')
            for k in range(delta.shape[1]):
                axes[1].plot(nfe, delta[:, k], 'o-' if k == 0 else 's--', color=line[0].get_color(), label=method if k == 0 else None)
    axes[0].set_yscale('log'); axes[0].set_ylabel('FD-digits'); axes[0].set_title('FD in digit-classifier features', fontsize=10)
    if base is None:
        axes[1].set_yscale('log'); axes[1].set_ylabel('FD-pixels'); axes[1].set_title('FD in pixel space', fontsize=10)
    else:
        axes[1].axhline(0, color='k', lw=0.8)
        axes[1].set_yscale('symlog', linthresh=10)
        axes[1].set_ylabel('FD-digits minus no guidance (< 0: better)')
        axes[1].set_title('Against no guidance on the same seeds (o: draw 1, s: draw 2)', fontsize=10)
    for ax in axes:
        ax.set_xlabel('NFE (Heun)'); ax.grid(alpha=0.3, which='both'); ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)

def table(result):
    """Markdown: FD-digits per NFE and method, each cell the seed draws separated by /."""
    methods = list(result['methods'])
    nfes = [r['nfe'] for r in result['methods'][methods[0]]]
    cell = lambda v: ' / '.join(f'{x:.1f}' for x in np.atleast_1d(v))
    lines = ['| NFE | ' + ' | '.join(methods) + ' |', '|---:|' + '---:|' * len(methods)]
    for i, n in enumerate(nfes):
        lines.append(f'| {n} | ' + ' | '.join(cell(result['methods'][m][i]['fd_digits']) for m in methods) + ' |')
    return '\n'.join(lines)

def merge(paths, out):
    """One table and plot from several runs of this script (same data, seeds and NFE)."""
    results = [json.load(open(p)) for p in paths]
    merged = dict(settings=[r['settings'] for r in results], methods={k: v for r in results for k, v in r['methods'].items()})
    with open(out + '.json', 'w') as f:
        json.dump(merged, f, indent=1)
    plot(merged, out + '.png')
    print(table(merged))

@click.command()
@click.option('--data',      help='Labelled digits dataset', metavar='ZIP|DIR', type=str)
@click.option('--network',   help='Network to guide', metavar='PATH', type=str)
@click.option('--dg', 'dgs', help='Discriminator (train_discriminator.py); repeat to compare', metavar='PATH', multiple=True)
@click.option('--name', 'names', help='Label of each --dg', metavar='STR', multiple=True)
@click.option('--dg-weight', help='DG weights (first order) to try with each --dg', metavar='LIST', type=str, default='2', show_default=True)
@click.option('--dg-time-max', help='Guide only at VP times t <= this', metavar='FLOAT', type=click.FloatRange(min=0, max=1), default=1.0, show_default=True)
@click.option('--dg-boosting', help="DG's boosting (extra churn for samples judged fake)", is_flag=True)
@click.option('--seeds',     help='Seeds', metavar='LIST', default='0-499', show_default=True)
@click.option('--draws',     help='Split the seeds into this many equal draws, one FD each (the spread between seed draws)', metavar='INT', type=click.IntRange(min=1), default=1, show_default=True)
@click.option('--nfe',       help='Heun NFE budgets (odd)', metavar='LIST', default='7,11,15,19,27,35', show_default=True)
@click.option('--rho',       help='Time step exponent', metavar='FLOAT', type=float, default=7, show_default=True)
@click.option('--batch',     help='Images per sampler call', metavar='INT', type=int, default=250, show_default=True)
@click.option('--baseline/--no-baseline', help='Also sample without guidance', default=True, show_default=True)
@click.option('--merge', 'merge_paths', help='Only merge these PREFIX.json of earlier runs into --out', metavar='LIST', type=str)
@click.option('--out',       help='Output prefix: PREFIX.json, PREFIX.png, PREFIX-samples.png', metavar='PATH', type=str, required=True)
@torch.no_grad() # scoped to main(), not process-wide: callers that import main() keep autograd
def main(data, network, dgs, names, dg_weight, dg_time_max, dg_boosting, seeds, draws, nfe, rho, batch, baseline, merge_paths, out):
    """FD-digits per NFE for no guidance and each discriminator."""
    if merge_paths:
        return merge(merge_paths.split(','), out)
    if not (data and network):
        raise click.UsageError('--data and --network are needed (unless --merge)')
    seeds, nfes = parse_int_list(seeds, 'seed'), sorted(set(parse_int_list(nfe, 'NFE')))
    names = list(names) or [os.path.basename(os.path.dirname(p)) for p in dgs]
    if len(names) != len(dgs):
        raise click.BadParameter('give one --name per --dg', param_hint='--name')
    try:
        weights = [float(w) for w in dg_weight.split(',')]
    except ValueError:
        raise click.BadParameter(f'"{dg_weight}" is not a comma-separated list of numbers', param_hint='--dg-weight')
    if len(seeds) % draws:
        raise click.BadParameter(f'{len(seeds)} seeds do not split into {draws} equal draws', param_hint='--draws')
    warnings.filterwarnings('ignore', category=scipy.linalg.LinAlgWarning)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)

    images, labels = load_digits(data)
    with torch.enable_grad():
        classifier, accuracy, _ = train_classifier(images, labels)
    real_feat, real_pix = classifier.features(images), images.flatten(1)
    # The floor that sample size alone gives: FD of random real images (as many as one draw) to all.
    subset = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:len(seeds) // draws]
    floor = frechet(classifier.features(images[subset]), real_feat)
    print(f'FD-digits of {len(subset)} real images to all {len(images)}: {floor:.3f}')
    net = load_network(network)
    methods = {'no guidance': (None, 0)} if baseline else {}
    for name, path in zip(names, dgs):
        disc = guidance.load_discriminator(path)
        problem = guidance.incompatibility(disc, net)
        if problem:
            raise click.ClickException(f'{path}: {problem}')
        for w in weights:
            methods[name if len(weights) == 1 else f'{name} w={w:g}'] = (DiscriminatorGuidance(disc, time_max=dg_time_max), w)
    result = dict(settings=dict(data=data, network=network, seeds=[seeds[0], seeds[-1]], draws=draws, fd_digits_real_floor=floor, nfe=nfes, rho=rho, dg_weight=weights, dg_time_max=dg_time_max, dg_boosting=dg_boosting,
                                classifier_accuracy=accuracy, discriminators=dict(zip(names, dgs))), methods={})
    grid = []
    for method, (dg, w) in methods.items():
        rows = []
        for n in nfes:
            samples = []
            for chunk in tqdm.tqdm([seeds[i:i + batch] for i in range(0, len(seeds), batch)], desc=f'{method} NFE {n}', unit='batch'):
                latents, class_labels, rnd = latents_for_seeds(net, chunk)
                kwargs = dict(guidance=dg, dg_weight=w, dg_boosting=dg_boosting) if dg is not None else {}
                sampler_fn = guided_edm_sampler if dg is not None else edm_sampler # DG's EDM-G++, else EDM's Heun
                x = sampler_fn(MinBatchNet(net), latents, class_labels, randn_like=rnd.randn_like, num_steps=heun_steps(n), rho=rho, **kwargs)
                samples.append(quantize(x))
            samples = torch.cat(samples)
            parts = samples.chunk(draws)
            rows.append(dict(nfe=n, fd_digits=[frechet(classifier.features(x), real_feat) for x in parts],
                             fd_pixels=[frechet(x.flatten(1), real_pix) for x in parts]))
            print(f'{method} NFE {n:3d}: FD-digits {" / ".join(f"{v:.3f}" for v in rows[-1]["fd_digits"])}  '
                  f'FD-pixels {" / ".join(f"{v:.3f}" for v in rows[-1]["fd_pixels"])}', flush=True)
            if n == nfes[-1]:
                grid.append(to_uint8(samples[:16]))
        result['methods'][method] = rows
        with open(out + '.json', 'w') as f: # after each method, so a stopped run keeps what it measured
            json.dump(result, f, indent=1)
    save_image_grid(np.concatenate(grid), f'{out}-samples.png', cols=16, scale=max(1, 64 // grid[0].shape[1]), gap=2) # one row per method

    plot(result, out + '.png')
    print(table(result))
    print(f'Wrote {out}.json, {out}.png, {out}-samples.png')

if __name__ == '__main__':
    main()
