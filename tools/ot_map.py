"""Build an OT-start map (sampling/ot_start.py) for a network and save it as .safetensors.

Targets at noise level sigma_T come from one of two sources, recorded in the file:
  --source=ode   data-free: the network's own Heun ODE states at sigma_T from seeds
                 --first-seed .. --first-seed + --targets - 1 (costs NFE, reported)
  --source=data  data-dependent: training images plus sigma_T * noise; samples can copy them

    python tools/ot_map.py --network=net.pkl --source=ode --sigma-T=2 --targets=1000 --out=ode-2.safetensors
    python tools/ot_map.py --network=net.pkl --source=data --data=datasets/uci-digits-16x16.zip \\
        --sigma-T=2 --out=data-2.safetensors
    python generate.py --network=net.pkl --ot-map=ode-2.safetensors --steps=4 --outdir=out
"""

import time

import click
import numpy as np
import torch

from sampling import ot_start
from training.dataset import ImageFolderDataset
from training.network_io import load_network
from dnnlib.util import one_line

def load_images(path, net, max_images):
    """Images [M, C, H, W] in [-1, 1] and one-hot labels (None for an unconditional network)."""
    try:
        ds = ImageFolderDataset(path, use_labels=bool(net.label_dim), max_size=max_images)
    except Exception as e:
        raise click.ClickException(f'Cannot read --data {path}: {one_line(e)}')
    shape = [net.img_channels, net.img_resolution, net.img_resolution]
    if list(ds.image_shape) != shape:
        raise click.ClickException(f'--data holds {"x".join(map(str, ds.image_shape))} images (CxHxW), the network makes {"x".join(map(str, shape))}')
    if net.label_dim and ds.label_dim != net.label_dim:
        raise click.ClickException(f'the network is conditional ({net.label_dim} classes), --data has {ds.label_dim or "no"} labels')
    images = torch.as_tensor(np.stack([ds[i][0] for i in range(len(ds))])).float() / 127.5 - 1
    labels = torch.as_tensor(np.stack([ds[i][1] for i in range(len(ds))])) if net.label_dim else None
    return images, labels, torch.as_tensor(ds._raw_idx.copy())

@click.command()
@click.option('--network',      help='Network snapshot (.pkl, .safetensors or URL)', metavar='PATH', type=str, required=True)
@click.option('--source',       help='Targets: the network\'s ODE states (no data) or noised training images', type=click.Choice(ot_start.SOURCES), required=True)
@click.option('--sigma-T', 'sigma_T', help='Noise level of the targets', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), required=True)
@click.option('--out',          help='Output .safetensors file', metavar='PATH', type=str, required=True)
@click.option('--data',         help='Training images (--source=data)', metavar='ZIP|DIR', type=str)
@click.option('--targets', 'num_targets', help='Number of targets  [default: ode 1000, data all images]', metavar='INT', type=click.IntRange(min=2))
@click.option('--first-seed',   help='First seed of the ODE targets (keep apart from the sample seeds)', metavar='INT', type=click.IntRange(min=0), default=1000000, show_default=True)
@click.option('--target-steps', help='Heun noise levels from sigma_max down to sigma_T (ode: 2(N-1) NFE per target)', metavar='INT', type=click.IntRange(min=2), default=12, show_default=True)
@click.option('--rho',          help='Noise level spacing of the ODE targets', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=7, show_default=True)
@click.option('--noise-seed',   help='Seed of the noise added to the images (data)', metavar='INT', type=int, default=0, show_default=True)
@click.option('--fit-steps',    help='Adam steps on the dual', metavar='INT', type=click.IntRange(min=1), default=300, show_default=True)
@click.option('--fit-samples',  help='Latents per step  [default: 20 per target]', metavar='INT', type=click.IntRange(min=1))
@click.option('--lr',           help='Adam step, relative to the RMS target norm', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=0.05, show_default=True)
@click.option('--batch',        help='Images per network call', metavar='INT', type=click.IntRange(min=1), default=64, show_default=True)
@click.option('--device',       help='Device  [default: cuda if available, else cpu]', metavar='STR', type=str)
@torch.no_grad() # scoped to main(), not process-wide: callers that import main() keep autograd
def main(network, source, sigma_T, out, data, num_targets, first_seed, target_steps, rho, noise_seed, fit_steps, fit_samples, lr, batch, device):
    """Fit a semi-discrete OT map from white noise to targets at sigma_T and save it."""
    if (source == 'data') != (data is not None):
        raise click.BadParameter('--data is needed with --source=data and only there', param_hint='--data')
    device = torch.device(device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    try:
        net = load_network(network, device=device)
    except Exception as e:
        raise click.ClickException(f'Cannot load network "{network}": {one_line(e)}')
    if not sigma_T < float(net.sigma_max):
        raise click.BadParameter(f'{sigma_T} is not below the network\'s sigma_max {float(net.sigma_max):g}', param_hint='--sigma-T')
    t0 = time.time()
    meta = dict(network=network, created=time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime()))
    if source == 'ode':
        seeds = list(range(first_seed, first_seed + (num_targets or 1000)))
        targets, labels, nfe = ot_start.ode_targets(net, seeds, sigma_T, target_steps, rho, batch, device, progress=True)
        ids = seeds
        meta.update(targets_from=f'Heun ODE states of the network at sigma_T from seeds {seeds[0]}-{seeds[-1]} (no data)',
                    target_steps=target_steps, rho=rho, nfe_per_target=nfe, nfe_total=nfe * len(seeds))
        print(f'{len(seeds)} ODE targets: {nfe} NFE each, {nfe * len(seeds)} in all ({time.time() - t0:.0f} s)')
    else:
        images, labels, ids = load_images(data, net, num_targets)
        targets = ot_start.data_targets(images, sigma_T, noise_seed)
        meta.update(targets_from=f'training images of {data} plus sigma_T * noise (DATA-DEPENDENT: samples can copy them)',
                    data=data, noise_seed=noise_seed, nfe_per_target=0, nfe_total=0)
    t1 = time.time()
    h, report = ot_start.fit_potentials(targets.to(device), steps=fit_steps, samples_per_step=fit_samples, lr=lr, progress=True)
    meta.update(fit=dict(report, steps=fit_steps, samples_per_step=fit_samples or 20 * len(targets), lr=lr, seconds=round(time.time() - t1, 1)))
    print(f'Fit: largest cell mass deviation {report["max_relative_deviation"]:.3f} of 1/M '
          f'(sampling noise of the estimate {report["sampling_noise_relative"]:.3f}), {report["empty_cells"]} empty cells')
    ot_start.OTMap(targets, h.cpu(), sigma_T, source, labels, ids, meta).save(out)
    print(f'Saved {source} OT map with {len(targets)} targets at sigma_T={sigma_T:g} to "{out}"')

if __name__ == '__main__':
    main()
