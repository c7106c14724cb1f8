"""How much a network's output, and a sampled image, depend on the batch it is computed in (CPU).

For each batch size n, the first n of a fixed set of inputs are evaluated alone and compared with the
same samples inside the full batch: raw, and through MinBatchNet (padding to >= 4).
Measured on the golden DDPM++ test network (16x16) and on EDM's CIFAR-10 DDPM++ network (32x32,
128 channels, random weights), and, for the small one, after a whole edm_sampler run (18 steps).
The numbers quoted in docs/sampling.md come from this script.

    python bench/batch_invariance.py --threads=1
"""


import click
import numpy as np
import torch

from bench import report
from training import networks
from sampling.denoisers import MinBatchNet
from sampling.edm import edm_sampler
from sampling.seeds import latents_for_seeds
from sampling.images import to_uint8
from training.testdata import load_golden_network

def cifar_ddpmpp():
    """EDM's train.py --arch=ddpmpp network for unconditional 32x32 RGB, random weights."""
    torch.manual_seed(0)
    return networks.EDMPrecond(img_resolution=32, img_channels=3, label_dim=0, model_type='SongUNet',
        embedding_type='positional', encoder_type='standard', decoder_type='standard', channel_mult_noise=1,
        resample_filter=[1, 1], model_channels=128, channel_mult=[2, 2, 2], augment_dim=9).eval().requires_grad_(False)

def output_differences(net, full, sizes, sigma=2.5):
    """{n: (raw, padded)} max |out(first n alone) - out(full batch)[:n]|."""
    latents, labels, _ = latents_for_seeds(net, list(range(full)))
    x = latents * sigma
    sigma = torch.tensor(sigma, dtype=torch.float64)
    with torch.no_grad():
        ref = net(x, sigma, labels)
        cut = lambda t, n: None if t is None else t[:n]
        return {n: tuple((fn(x[:n], sigma, cut(labels, n)) - ref[:n]).abs().max().item()
                         for fn in (net, MinBatchNet(net))) for n in sizes}

def sample_differences(net, full, sizes, steps=18):
    """{n: (max |image diff|, uint8 pixels that differ)} for edm_sampler without padding."""
    def run(seeds):
        latents, labels, rnd = latents_for_seeds(net, seeds)
        with torch.no_grad():
            return edm_sampler(net, latents, labels, randn_like=rnd.randn_like, num_steps=steps)
    ref = run(list(range(full)))
    out = {}
    for n in sizes:
        alone = run(list(range(n)))
        out[n] = ((alone - ref[:n]).abs().max().item(), int((to_uint8(alone) != to_uint8(ref[:n])).sum()), to_uint8(alone).size)
    return out

@click.command()
@click.option('--threads', help='Torch threads', metavar='INT', type=click.IntRange(min=1), default=1, show_default=True)
@click.option('--full',    help='Size of the full batch', metavar='INT', type=click.IntRange(min=2), default=8, show_default=True)
def main(threads, full):
    torch.set_num_threads(threads)
    print(report.machine())
    sizes = list(range(1, full))
    small = load_golden_network('networks/ddpmpp_edm_cond.npz', 'networks/ddpmpp_edm_cond.json')
    for name, net in [('golden ddpmpp_edm_cond 16x16', small), ('EDM CIFAR-10 DDPM++ 32x32, 128 ch, random weights', cifar_ddpmpp())]:
        print(f'\n{name}: max |D(x) alone - D(x) in a batch of {full}| at sigma 2.5')
        print('| n | raw | MinBatchNet |\n|---:|---:|---:|')
        for n, (raw, padded) in output_differences(net, full, sizes).items():
            print(f'| {n} | {raw:.1e} | {padded:.1e} |')
    print(f'\ngolden ddpmpp_edm_cond: edm_sampler 18 steps, first n seeds alone vs in a batch of {full} (no padding)')
    print('| n | max |image diff| | uint8 values that differ |\n|---:|---:|---:|')
    for n, (diff, pixels, total) in sample_differences(small, full, sizes).items():
        print(f'| {n} | {diff:.1e} | {pixels} of {total} |')

if __name__ == '__main__':
    main()
