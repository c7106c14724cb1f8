"""Sampling speed against its floor: NFE x one network forward at the same batch.

Three timings, interleaved round by round so that load changes hit all of them alike (medians kept);
on CPU they are the process's CPU time, which other programs on a shared machine do not inflate:
  floor      NFE network forwards on a batch (what sampling cannot go below)
  sampler    edm_sampler on the batch's latents
  generate   generate.py's per-batch work (sampling.generate's sample_batch and write_pngs): per-seed latents,
             edm_sampler, uint8, one PNG per seed
Ratios floor/sampler and floor/generate; the goal is >= 0.95.

    python bench/sampling_speed.py                                   # golden test network (16x16)
    python bench/sampling_speed.py --network=runs/.../network-snapshot-000100.pkl --batch=64 --steps=18
"""

import json
import os
import statistics
import tempfile
import time

import click
import torch

from bench import report
from training import networks
from sampling import generate as generation
from sampling.denoisers import trace_sampler
from sampling.edm import edm_sampler
from sampling.seeds import latents_for_seeds
from training.network_io import load_network

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, 'tests', 'golden', 'networks', 'ddpmpp_edm_cond.json')

def golden_network(device):
    """The golden DDPM++ EDMPrecond test network's architecture with random weights (speed only)."""
    with open(GOLDEN) as f:
        kwargs = json.load(f)['constructor_kwargs']
    torch.manual_seed(0)
    return networks.EDMPrecond(**kwargs).eval().requires_grad_(False).to(device), 'golden ddpmpp_edm_cond (16x16x3, random weights)'

@click.command()
@click.option('--network', help='Network snapshot  [default: the golden test network]', metavar='PATH', type=str)
@click.option('--batch',   help='Images per batch', metavar='INT', type=click.IntRange(min=1), default=64, show_default=True)
@click.option('--steps',   help='Heun steps (NFE = 2*steps-1)', metavar='INT', type=click.IntRange(min=2), default=18, show_default=True)
@click.option('--rounds',  help='Timing rounds (medians reported)', metavar='INT', type=click.IntRange(min=1), default=5, show_default=True)
@click.option('--threads', help='Torch threads  [default: torch default]', metavar='INT', type=click.IntRange(min=1))
@click.option('--device',  help='Device  [default: cuda if available]', metavar='STR', type=str)
@click.option('--doc/--no-doc', help='Rewrite the section in docs/benchmarks.md', default=True, show_default=True)
def main(network, batch, steps, rounds, threads, device, doc):
    """Time sampling against NFE x one forward."""
    if threads is not None:
        torch.set_num_threads(threads)
    env = report.machine()
    device = torch.device(device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    if network is None:
        net, desc = golden_network(device)
    else:
        try:
            net, desc = load_network(network, device=device), network
        except Exception as e:
            raise click.ClickException(f'Cannot load network "{network}": {type(e).__name__}: {e}')
    nfe, _ = trace_sampler(net, edm_sampler, device=device, num_steps=steps)
    seeds = list(range(batch))
    latents, class_labels, rnd = latents_for_seeds(net, seeds, device=device)
    sigma = torch.full([batch], 1.0, dtype=torch.float64, device=device)
    x64 = latents.to(torch.float64)
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    clock, clock_name = (time.perf_counter, 'wall') if device.type == 'cuda' else (time.process_time, 'CPU')

    def floor():
        for _ in range(nfe):
            net(x64, sigma, class_labels)
    def sampler():
        edm_sampler(net, latents, class_labels, randn_like=rnd.randn_like, num_steps=steps)
    def generate(outdir):
        draw = lambda seeds: latents_for_seeds(net, seeds, device=device)
        images, classes = generation.sample_batch(net, edm_sampler, dict(num_steps=steps), draw, seeds)
        generation.write_pngs(images, classes, seeds, outdir, False)

    times = dict(floor=[], sampler=[], generate=[])
    print(env)
    print(f'{desc}: batch {batch}, {steps} steps = {nfe} NFE, {rounds} rounds + warm-up')
    with torch.no_grad(), tempfile.TemporaryDirectory() as outdir:
        for r in range(rounds + 1):
            for name, fn in (('floor', floor), ('sampler', sampler), ('generate', lambda: generate(outdir))):
                sync(); start = clock(); fn(); sync()
                if r > 0: # round 0 warms up
                    times[name].append(clock() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    lines = ['## Sampling speed (`bench/sampling_speed.py`)', '',
             f'{desc}, batch {batch}, Heun {steps} steps = {nfe} NFE; medians of {rounds} interleaved rounds of {clock_name} time.', '',
             f'| what | {clock_name} s per batch | images/{clock_name} s | floor / this |', '|---|---:|---:|---:|']
    for name, label in (('floor', f'floor: {nfe} x one forward'), ('sampler', 'edm_sampler'), ('generate', 'generate.py loop (latents, sampler, uint8, PNGs)')):
        lines.append(f'| {label} | {med[name]:.3f} | {batch / med[name]:.1f} | {med["floor"] / med[name]:.3f} |')
    verdict = 'meets' if med['floor'] / med['generate'] >= 0.95 else 'misses'
    lines += ['', f'generate.py loop at {med["floor"] / med["generate"]:.3f} of the floor: {verdict} the goal (>= 0.95).']
    print('\n'.join(lines))
    if doc:
        report.update_section(f'sampling_speed{"" if network is None else "_network"}', '\n'.join(lines), env)

if __name__ == '__main__':
    main()
