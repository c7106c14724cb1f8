"""Images from seeds, as generate.py makes them: seed lists, the sampler the options choose, one
batch sampled to uint8, and PNGs in EDM's folder layout written by a thread while the next batch
samples. generate.py's loop, and the benchmarks and tools that time or reuse it, call these."""

import concurrent.futures
import os
import re

import torch

from training import sampling, solvers
from training.images import to_uint8, save_png

#----------------------------------------------------------------------------
# Seeds.

MAX_SEEDS = 10_000_000 # per run of generate.py: 200 full FID sets of 50,000; more is better split into runs (the seed list lives in memory on every rank)
SEED_LIMIT = 1 << 32   # seeds are torch.Generator seeds modulo 2^32 (as in EDM): a larger one would repeat a smaller one's image

def parse_seeds(text):
    """'0-49999,100,5-7' -> [0, ..., 49999, 100, 5, 6, 7]. Raises ValueError naming the bad part.
    The count is checked before any list is built, so a huge range is an error, not a MemoryError."""
    ranges = []
    for part in text.split(','):
        m = re.fullmatch(r'\s*(\d+)\s*(?:-\s*(\d+)\s*)?', part)
        if m is None:
            raise ValueError(f'"{part}" is neither a seed nor a range like 5-7')
        lo = int(m.group(1))
        hi = lo if m.group(2) is None else int(m.group(2))
        if hi < lo:
            raise ValueError(f'range "{part}" is empty; write it low-high')
        ranges.append(range(lo, hi + 1))
    count = sum(len(r) for r in ranges)
    if count > MAX_SEEDS:
        raise ValueError(f'{count:,} seeds, more than the {MAX_SEEDS:,} one run takes; split them into several runs into the same folder')
    top = max(r[-1] for r in ranges)
    if top >= SEED_LIMIT:
        raise ValueError(f'seed {top} is above {SEED_LIMIT - 1}: seeds are used modulo 2^32, so it would repeat the image of seed {top % SEED_LIMIT}')
    seeds = [seed for r in ranges for seed in r]
    repeated = len(seeds) - len(set(seeds))
    if repeated:
        raise ValueError(f'{repeated} seed(s) appear more than once; each seed names one image')
    return seeds

#----------------------------------------------------------------------------
# The sampler of generate.py's options.

# Few-step solvers (training/solvers.py, docs/few-step.md); euler and heun stay EDM's ablation solvers.
FEW_STEP = [name for name in solvers.SOLVERS if name != 'euler']

def few_step_kwargs(sampler_kwargs, net):
    """solvers.sample's keyword arguments from the options (ValueError with a one-line reason)."""
    if 'sigmas' in sampler_kwargs:
        sigmas = solvers.check_sigmas(solvers.read_sigmas(sampler_kwargs['sigmas']))
    else:
        sigma_min = max(sampler_kwargs.get('sigma_min', 0.002), float(net.sigma_min)) # the network's supported range
        sigma_max = min(sampler_kwargs.get('sigma_max', 80), float(net.sigma_max))
        sigmas = solvers.get_sigmas(sampler_kwargs.get('discretization', 'edm'), sampler_kwargs['num_steps'], sigma_min, sigma_max, sampler_kwargs['rho'])
    # The defaults filled in (order, variant), so that the record of how the images were made names them.
    return dict(solver=sampler_kwargs['solver'], sigmas=sigmas, **solvers.check_solver(sampler_kwargs['solver'], sigmas,
                sampler_kwargs.get('order'), sampler_kwargs.get('afs', False), sampler_kwargs.get('variant')))

def choose_sampler(net, sampler_kwargs):
    """(sampler_fn, its keyword arguments) for the sampler options of the command line (None values
    dropped): EDM's Heun sampler, the ablation sampler, or a few-step solver. ValueError with a one-line reason."""
    if sampler_kwargs.get('solver') in FEW_STEP:
        return solvers.sample, few_step_kwargs(sampler_kwargs, net)
    have_ablation_kwargs = any(x in sampler_kwargs for x in ['solver', 'discretization', 'schedule', 'scaling'])
    return (sampling.ablation_sampler if have_ablation_kwargs else sampling.edm_sampler), sampler_kwargs

#----------------------------------------------------------------------------
# Sampling and writing, one batch at a time.

def png_name(seed, subdirs):
    """Path of seed's PNG relative to the output folder (EDM's layout; dataset.json lists these paths)."""
    return f'{seed - seed % 1000:06d}/{seed:06d}.png' if subdirs else f'{seed:06d}.png'

def sample_batch(net, sampler_fn, sampler_kwargs, draw, batch_seeds):
    """uint8 NHWC images of batch_seeds and their classes (None when unconditional)."""
    latents, class_labels, rnd = draw(batch_seeds)
    with torch.no_grad():
        images = sampler_fn(sampling.MinBatchNet(net), latents, class_labels, randn_like=rnd.randn_like, **sampler_kwargs)
    classes = [None] * len(batch_seeds) if class_labels is None else class_labels.argmax(dim=1).tolist()
    return to_uint8(images), classes

def sample_then_write(batches, sample, write):
    """Yield, for each batch in turn, the future of write(*sample(batch), batch), one batch late:
    a thread writes batch k while batch k + 1 samples. PNG encoding and file writes cost ~0.5 ms of
    CPU per image, which would otherwise leave a GPU idle (several percent of a batch at 10 NFE).
    An iterable of batches that ends early (a stop request) still yields every sampled batch."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as writer:
        queued = []
        for batch in batches:
            queued.append(writer.submit(write, *sample(batch), batch))
            if len(queued) == 2:
                yield queued.pop(0)
        yield from queued

def write_pngs(images, classes, batch_seeds, outdir, subdirs):
    """Write one PNG per seed; {file name: class}."""
    written = {}
    for seed, image, label in zip(batch_seeds, images, classes):
        name = png_name(seed, subdirs)
        os.makedirs(os.path.dirname(os.path.join(outdir, name)), exist_ok=True)
        save_png(image, os.path.join(outdir, name))
        written[name] = label
    return written

#----------------------------------------------------------------------------
