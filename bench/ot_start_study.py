"""OT-start sampling (DPM-OT style) against plain Heun on the digits: does it generate or retrieve?

For one network: plain Heun at each NFE budget, and OT-start (training/ot_start.py) for
each sigma_T and target source (data-free ODE states, or training images noised to sigma_T) at
each step count. Every row gets FD-digits (bench/digits_fd.py's classifier features), and:

  memorisation  share of samples whose nearest training image (pixel L2, images in [-1, 1]) is
                closer than 1/3 of the distance to the second nearest
  mode mixture  share of samples the digit classifier does not put in one class: top softmax
                probability < 0.5
  distinct      how many different OT targets the samples used (OT-start only)

    python bench/ot_start_study.py --data=datasets/uci-digits-16x16.zip --network=net.pkl \\
        --seeds=0-499 --nfe=5,7,9,11 --sigma-T=1,2.5,5 --ot-steps=2,3,4,6 --out=out/ot/aot
"""

import json
import os
import time
import warnings

import click
import numpy as np
import scipy.linalg
import torch
import tqdm

from bench.digits_fd import load_digits, train_classifier, frechet, quantize
from sampling import ot_start
from sampling.edm import edm_sampler
from sampling.seeds import latents_for_seeds
from sampling.images import to_uint8, save_image_grid
from training.network_io import load_network
from tools.trajectory import heun_steps, parse_int_list, pyplot

MEMORISED_RATIO = 1 / 3 # nearest / second-nearest training image distance below this: a copy
MIXED_BELOW = 0.5       # top class probability below this: a mode mixture

#----------------------------------------------------------------------------
# Checks.

def nearest(samples, train):
    """Per sample: (distance to the nearest training image / distance to the second nearest, index of the nearest)."""
    d = torch.cdist(samples.flatten(1).double(), train.flatten(1).double())
    two = d.topk(2, dim=1, largest=False)
    return two.values[:, 0] / two.values[:, 1].clamp(min=1e-12), two.indices[:, 0]

def nearest_ratio(samples, train):
    return nearest(samples, train)[0]

def memorisation_rate(samples, train):
    return float((nearest_ratio(samples, train) < MEMORISED_RATIO).double().mean())

def mode_mixture_rate(classifier, samples):
    return float((classifier(samples).softmax(dim=1).amax(dim=1) < MIXED_BELOW).double().mean())

#----------------------------------------------------------------------------

def run_sampler(sample_batch, seeds, batch):
    """Concatenated quantized images (and OT indices, if the sampler returns them) over seed chunks."""
    images, index = [], []
    for b in range(0, len(seeds), batch):
        out = sample_batch(seeds[b:b + batch])
        x, i = out if isinstance(out, tuple) else (out, None)
        images.append(quantize(x))
        if i is not None:
            index.append(i)
    return torch.cat(images), (torch.cat(index) if index else None)

def measure(samples, classifier, real_feat, images, source_index=None):
    """FD-digits, memorisation, mode mixture, the median nearest/second-nearest ratio and, for
    data targets (source_index: the training image each sample's target was made from), the
    share of samples whose nearest training image is their target's own image."""
    ratio, index = nearest(samples, images)
    row = dict(fd_digits=frechet(classifier.features(samples), real_feat),
               memorisation=memorisation_rate(samples, images), nearest_ratio_median=float(ratio.median()),
               mode_mixture=mode_mixture_rate(classifier, samples))
    if source_index is not None:
        row['nearest_is_own_image'] = float((index == source_index).double().mean())
    return row

@click.command()
@click.option('--data',      help='Labelled digits dataset (the training data)', metavar='ZIP|DIR', type=str, required=True)
@click.option('--network',   help='Network snapshot (.pkl or .safetensors)', metavar='PATH', type=str, required=True)
@click.option('--seeds',     help='Sample seeds', metavar='LIST', default='0-499', show_default=True)
@click.option('--nfe',       help='Plain Heun NFE budgets (odd)', metavar='LIST', default='5,7,9,11', show_default=True)
@click.option('--sigma-T', 'sigmas', help='OT-start noise levels', metavar='LIST', default='1,2.5,5', show_default=True)
@click.option('--ot-steps',  help='OT-start Heun steps from sigma_T (2N-1 NFE)', metavar='LIST', default='2,3,4,6', show_default=True)
@click.option('--heun-sigma-max', 'heun_sigma_max', help='Also plain Heun from pure noise at these sigma_max (control for the shorter schedule)', metavar='LIST', default='', show_default=True)
@click.option('--sources',   help='Target sources', metavar='LIST', default='ode,data', show_default=True)
@click.option('--ode-targets', help='Number of ODE targets (seeds from 1000000)', metavar='INT', type=click.IntRange(min=2), default=1000, show_default=True)
@click.option('--target-steps', help='Heun levels from sigma_max to sigma_T for ODE targets', metavar='INT', type=click.IntRange(min=2), default=12, show_default=True)
@click.option('--fit-steps', help='Adam steps of the OT fit', metavar='INT', type=click.IntRange(min=1), default=50, show_default=True)
@click.option('--fit-samples', help='Latents per fit step', metavar='INT', type=click.IntRange(min=1), default=10000, show_default=True)
@click.option('--batch',     help='Images per sampler call', metavar='INT', type=click.IntRange(min=1), default=250, show_default=True)
@click.option('--out',       help='Output prefix: PREFIX.json, PREFIX.png, PREFIX-samples.png', metavar='PATH', type=str, required=True)
@torch.no_grad() # scoped to main(), not process-wide: callers that import main() keep autograd
def main(data, network, seeds, nfe, sigmas, ot_steps, heun_sigma_max, sources, ode_targets, target_steps, fit_steps, fit_samples, batch, out):
    """FD-digits, memorisation and mode mixture of OT-start vs plain Heun, per NFE."""
    seeds = parse_int_list(seeds, 'seed')
    nfes = sorted(set(parse_int_list(nfe, 'NFE')))
    steps = [heun_steps(n) for n in nfes]
    sigmas = [float(s) for s in sigmas.split(',')]
    ot_steps = sorted(set(parse_int_list(ot_steps, 'step')))
    sources = sources.split(',')
    if not set(sources) <= set(ot_start.SOURCES):
        raise click.BadParameter(f'sources are {", ".join(ot_start.SOURCES)}', param_hint='--sources')
    warnings.filterwarnings('ignore', category=scipy.linalg.LinAlgWarning)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)

    images, labels = load_digits(data)
    with torch.enable_grad():
        classifier, accuracy, perm = train_classifier(images, labels)
    real_feat = classifier.features(images)
    held = images[perm[int(0.8 * len(images)):]]
    net = load_network(network)
    if [net.img_channels, net.img_resolution] != [images.shape[1], images.shape[2]]:
        raise click.ClickException(f'the network makes {net.img_channels}x{net.img_resolution}x{net.img_resolution} images, the data are {"x".join(map(str, images.shape[1:]))}')
    result = dict(settings=dict(data=data, network=network, seeds=len(seeds), first_seed=seeds[0], nfe=nfes, sigma_T=sigmas,
                                ot_steps=ot_steps, ode_targets=ode_targets, target_steps=target_steps, fit_steps=fit_steps,
                                fit_samples=fit_samples, classifier_accuracy=accuracy, memorised_ratio=MEMORISED_RATIO, mixed_below=MIXED_BELOW),
                  # Real held-out digits: the mode-mixture rate of real data; memorisation against a set they are not in.
                  real_heldout=dict(mode_mixture=mode_mixture_rate(classifier, held)), heun=[], ot=[])
    grid = []

    def latents(chunk):
        return latents_for_seeds(net, chunk)[:2]
    for sigma_max, (n, s) in [(80.0, ns) for ns in zip(nfes, steps)] + [(float(v), ns) for v in heun_sigma_max.split(',') if v for ns in zip(nfes, steps)]:
        x, _ = run_sampler(lambda c: edm_sampler(net, *latents(c), num_steps=s, sigma_max=sigma_max), seeds, batch)
        result['heun'].append(dict(nfe=n, steps=s, sigma_max=sigma_max, **measure(x, classifier, real_feat, images)))
        grid.append(to_uint8(x[:16]))
        print(f'Heun NFE {n}: {result["heun"][-1]}', flush=True)
        save_json(result, out) # after every row: a cut-short run leaves what it measured

    for source in sources:
        for sigma_T in sigmas:
            t0 = time.time()
            if source == 'ode':
                target_seeds = list(range(1000000, 1000000 + ode_targets))
                targets, _, target_nfe = ot_start.ode_targets(net, target_seeds, sigma_T, target_steps, batch=batch)
                ids = target_seeds
            else:
                targets, target_nfe, ids = ot_start.data_targets(images, sigma_T), 0, None
            h, report = ot_start.fit_potentials(targets, steps=fit_steps, samples_per_step=fit_samples)
            ot_map = ot_start.OTMap(targets, h, sigma_T, source, target_ids=ids)
            print(f'{source} sigma_T {sigma_T}: {len(targets)} targets, {target_nfe} NFE each, fit {time.time() - t0:.0f} s, {report}', flush=True)
            for s in ot_steps:
                x, index = run_sampler(lambda c: ot_start.ot_start_sampler(net, latents(c)[0], ot_map, num_steps=s, return_index=True), seeds, batch)
                row = dict(source=source, sigma_T=sigma_T, steps=s, nfe=2 * s - 1, targets=len(targets), target_nfe_each=target_nfe,
                           target_nfe_total=target_nfe * len(targets), distinct_targets=int(index.unique().numel()),
                           fit=report, **measure(x, classifier, real_feat, images, index if source == 'data' else None))
                result['ot'].append(row)
                save_json(result, out)
                grid.append(to_uint8(x[:16]))
                print(f'  steps {s}: FD {row["fd_digits"]:.1f} mem {row["memorisation"]:.3f} mix {row["mode_mixture"]:.3f} distinct {row["distinct_targets"]} '
                      f'ratio {row["nearest_ratio_median"]:.3f} own {row.get("nearest_is_own_image", float("nan")):.3f}', flush=True)

    save_json(result, out)
    save_image_grid(np.concatenate(grid), f'{out}-samples.png', cols=16)
    plot(result, out + '.png')
    print(f'Wrote {out}.json, {out}.png, {out}-samples.png')

def save_json(result, out):
    with open(out + '.json.tmp', 'w') as f:
        json.dump(result, f, indent=1)
    os.replace(out + '.json.tmp', out + '.json')

def plot(result, path):
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), dpi=110)
    for ax, key, title in zip(axes, ('fd_digits', 'memorisation', 'mode_mixture'), ('FD-digits', 'memorisation rate', 'mode-mixture rate')):
        for sigma_max in sorted({r.get('sigma_max', 80.0) for r in result['heun']}, reverse=True):
            heun = [r for r in result['heun'] if r.get('sigma_max', 80.0) == sigma_max]
            ax.plot([r['nfe'] for r in heun], [r[key] for r in heun], 'k-o' if sigma_max == 80 else 'k:x', lw=2 if sigma_max == 80 else 1,
                    label='plain Heun' if sigma_max == 80 else f'Heun from noise at sigma {sigma_max:g}')
        for source, style in (('ode', '-'), ('data', '--')):
            for sigma_T in result['settings']['sigma_T']:
                rows = [r for r in result['ot'] if r['source'] == source and r['sigma_T'] == sigma_T]
                if rows:
                    ax.plot([r['nfe'] for r in rows], [r[key] for r in rows], style, marker='.', label=f'OT-start {source}, sigma_T={sigma_T:g}')
        ax.set_xlabel('NFE per image (excl. target building)'); ax.set_title(title, fontsize=10); ax.grid(alpha=0.3)
        if key == 'fd_digits':
            ax.set_yscale('log')
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path + '.tmp', format='png'); os.replace(path + '.tmp', path)

if __name__ == '__main__':
    main()
