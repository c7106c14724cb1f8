"""Images from seeds, as generate.py makes them: the sampler that options name (make_sampler, one
registry for EDM's samplers and the few-step solvers), and generate_images(), an iterator over
batches of seeds that samples each batch to uint8 images, in the spirit of edm2's
generate_images.py. generate.py, the training monitor's sample FD, bench/fewstep_speed.py and
tools call these; write_behind() writes one batch's PNGs in a thread while the next one samples.

A seed names the same image at any batch size and process count: latents and labels come from
one torch.Generator per seed (sampling/seeds.py) and the network runs on at least 4 samples at a
time (MinBatchNet)."""

import concurrent.futures
import os
from typing import NamedTuple

import numpy as np
import torch

from sampling import edm, solvers
from sampling.denoisers import MinBatchNet, trace_sampler
from sampling.guidance import guided_edm_sampler
from sampling.schedules import check_sigmas, get_sigmas, read_sigmas
from sampling.seeds import latents_for_seeds
from sampling.images import save_png, to_uint8

#----------------------------------------------------------------------------
# The sampler of a set of options.

# Few-step solvers (sampling/solvers.py, docs/few-step.md); euler and heun stay EDM's ablation solvers.
FEW_STEP = [name for name in solvers.SAMPLERS if name != 'euler']
ABLATION_OPTIONS = ('solver', 'discretization', 'schedule', 'scaling') # any of them: EDM's ablation sampler

# The names sampling.json records for each sampler (kept from the modules they lived in before sampling/).
RECORD_NAMES = {edm.edm_sampler: 'sampling.edm_sampler', edm.ablation_sampler: 'sampling.ablation_sampler', solvers.sample: 'solvers.sample'}

class Sampler(NamedTuple):
    """A sampler ready to run: fn(net, latents, class_labels, randn_like=..., **kwargs); nfe per
    image, and the noise levels the network is evaluated at (levels: the few-step solver's own)."""
    fn: object
    kwargs: dict
    nfe: int
    sigmas: list

    @property
    def few_step(self):
        return self.fn is solvers.sample

    @property
    def name(self):
        return RECORD_NAMES.get(self.fn, f'{self.fn.__module__}.{self.fn.__name__}')

    @property
    def levels(self):
        """The distinct noise levels, in order: the solver's for few-step solvers, else those evaluated."""
        return self.kwargs['sigmas'] if self.few_step else list(dict.fromkeys(self.sigmas))

def describe(sampler):
    """One line for the log: the sampler, its steps, NFE and noise levels (the few-step solvers end at
    their last level; EDM's samplers step from the last evaluated level to 0)."""
    levels = [f'{float(s):.4g}' for s in sampler.levels]
    shown = levels if len(levels) <= 8 else levels[:4] + ['...'] + levels[-2:]
    steps = f'{sampler.kwargs["solver"]}, {len(levels)} levels' if sampler.few_step else f'{sampler.kwargs["num_steps"]} steps'
    if 'eta' in sampler.kwargs: # a stochastic few-step sampler
        steps += f', eta {sampler.kwargs["eta"]:g}, noise scale {sampler.kwargs["s_noise"]:g}'
    return f'Sampler: {sampler.fn.__name__}, {steps}, {sampler.nfe} NFE per image; sigma {", ".join(shown + ([] if sampler.few_step else ["0"]))}'

class LevelsError(ValueError):
    """The options give noise levels that are not finite (finite=False) or do not decrease from top to bottom."""
    def __init__(self, message, top=None, bottom=None, finite=True):
        super().__init__(message)
        self.top, self.bottom, self.finite = top, bottom, finite

def few_step_kwargs(options, net):
    """solvers.sample's keyword arguments from the options (ValueError with a one-line reason)."""
    if 'sigmas' in options:
        sigmas = options['sigmas']
        sigmas = check_sigmas(read_sigmas(sigmas) if isinstance(sigmas, str) else sigmas)
    else:
        sigma_min = max(options.get('sigma_min', 0.002), float(net.sigma_min)) # the network's supported range
        sigma_max = min(options.get('sigma_max', 80), float(net.sigma_max))
        sigmas = get_sigmas(options.get('discretization', 'edm'), options['num_steps'], sigma_min, sigma_max, options['rho'])
    # The defaults filled in (order, variant, eta, s_noise), so that the record of how the images were made names them.
    # The stochastic samplers' noise scale is EDM's S_noise option (default 1).
    return dict(solver=options['solver'], sigmas=sigmas, **solvers.check_solver(options['solver'], sigmas,
                options.get('order'), options.get('afs', False), options.get('variant'), options.get('eta'), options.get('S_noise')))

def choose_sampler(net, options):
    """(sampler_fn, its keyword arguments) for sampler options (None values dropped; generate.py's
    names): EDM's Heun sampler, the ablation sampler, or a few-step solver. ValueError with a one-line reason."""
    if options.get('solver') in FEW_STEP:
        return solvers.sample, few_step_kwargs(options, net)
    return (edm.ablation_sampler if any(x in options for x in ABLATION_OPTIONS) else edm.edm_sampler), options

def make_sampler(net, options, device='cpu'):
    """The Sampler of the options, its NFE and noise levels found by a dry run (no network
    evaluation). ValueError for options that do not fit; LevelsError for levels that do not work."""
    fn, kwargs = choose_sampler(net, dict(options))
    nfe, sigmas = trace_sampler(net, fn, device=device, **kwargs)
    if not np.isfinite(sigmas).all():
        raise LevelsError('the options give noise levels that are not finite numbers', finite=False)
    if not sigmas[0] > sigmas[-1] > 0:
        raise LevelsError(f'noise levels {sigmas[0]:g} -> {sigmas[-1]:g} do not decrease: sigma_min must be below sigma_max',
                          top=sigmas[0], bottom=sigmas[-1])
    return Sampler(fn, kwargs, nfe, sigmas)

def with_guidance(sampler, guidance, dg_weight=2.0, dg_weight_2nd=None, dg_boosting=None):
    """(sampler fn, kwargs, DG's settings) that add Discriminator Guidance to a Sampler: the few-step
    solvers correct every evaluation (GuidedDenoiser, through solvers.sample's guidance); EDM's Heun
    sampler becomes DG's EDM-G++ (guided_edm_sampler). ValueError for the ablation sampler."""
    if sampler.few_step:
        if dg_weight_2nd is not None or dg_boosting is not None:
            raise ValueError('the second-order weight and boosting are DG\'s for EDM\'s Heun sampler; a few-step solver corrects every evaluation by the weight')
        settings = dict(dg_weight=dg_weight)
        return sampler.fn, dict(sampler.kwargs, guidance=guidance, **settings), settings
    if sampler.fn is not edm.edm_sampler:
        raise ValueError('Discriminator Guidance works with EDM\'s sampler and the few-step solvers, not the ablation sampler')
    settings = dict(dg_weight=dg_weight, dg_weight_2nd=dg_weight_2nd or 0.0, dg_boosting=bool(dg_boosting))
    return guided_edm_sampler, dict(sampler.kwargs, guidance=guidance, **settings), settings

#----------------------------------------------------------------------------
# Sampling, one batch at a time.

def png_name(seed, subdirs):
    """Path of seed's PNG relative to the output folder (EDM's layout; dataset.json lists these paths)."""
    return f'{seed - seed % 1000:06d}/{seed:06d}.png' if subdirs else f'{seed:06d}.png'

def seed_drawer(net, device='cpu', class_idx=None, ot_map=None):
    """draw(batch_seeds) -> (latents, class labels, per-seed generators) as generate.py draws them;
    with an OT map of a conditional network the labels are the picked targets' classes."""
    def draw(batch_seeds):
        latents, class_labels, rnd = latents_for_seeds(net, batch_seeds, device=device, class_idx=class_idx)
        if ot_map is not None and net.label_dim:
            class_labels = ot_map.labels_for(latents)
        return latents, class_labels, rnd
    return draw

def rank_batches(seeds, batch_size, rank=0, world_size=1):
    """This rank's batches (lists of seeds) of at most batch_size: every rank gets as many batches
    (some may be empty), so that all ranks take part in each batch's collective calls alike."""
    if not seeds:
        return []
    num_batches = ((len(seeds) - 1) // (batch_size * world_size) + 1) * world_size
    return [b.tolist() for b in torch.as_tensor(seeds, dtype=torch.int64).tensor_split(num_batches)[rank :: world_size]]

def sample_batch(net, sampler_fn, sampler_kwargs, draw, batch_seeds):
    """uint8 NHWC images of batch_seeds and their classes (None when unconditional)."""
    latents, class_labels, rnd = draw(batch_seeds)
    with torch.no_grad():
        images = sampler_fn(MinBatchNet(net), latents, class_labels, randn_like=rnd.randn_like, **sampler_kwargs)
    classes = [None] * len(batch_seeds) if class_labels is None else class_labels.argmax(dim=1).tolist()
    return to_uint8(images), classes

def generate_images(net, sampler_fn, sampler_kwargs, batches, draw=None):
    """For each batch of seeds in turn (any iterable of lists; an empty list gives an empty batch),
    yield (batch_seeds, uint8 NHWC images, classes). draw: seed_drawer(net) unless given."""
    draw = draw or seed_drawer(net)
    for batch_seeds in batches:
        images, classes = sample_batch(net, sampler_fn, sampler_kwargs, draw, batch_seeds) if batch_seeds else ([], [])
        yield batch_seeds, images, classes

def write_behind(generated, write):
    """Yield, for each (batch_seeds, images, classes) in turn, the future of write(images, classes,
    batch_seeds), one batch late: a thread writes batch k while batch k + 1 samples. PNG encoding and
    file writes cost ~0.5 ms of CPU per image, which would otherwise leave a GPU idle (several percent
    of a batch at 10 NFE). Input that ends early (a stop request) still yields every sampled batch."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as writer:
        queued = []
        for batch_seeds, images, classes in generated:
            queued.append(writer.submit(write, images, classes, batch_seeds))
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
