"""Semi-discrete optimal transport from white noise to M points, and OT-start sampling (DPM-OT).

The map sends a standard-normal latent z to one of M targets y_j (images at noise level sigma_T):

    T(z) = y_j  with  j = argmax_k <z, y_k> + h_k          (power cell of y_j)

The potentials h are fitted so that every cell holds mass 1/M of N(0, I): the minimiser of the
convex dual E(h) = E_z[max_k <z, y_k> + h_k] - mean_k h_k, whose gradient is (cell mass - 1/M),
estimated on minibatches of fresh z and followed by Adam (as DPM-OT and AE-OT do). This is the
quadratic-cost OT map from N(0, I) to the uniform measure on the targets. Scaling the source to
N(0, sigma_T^2 I) only rescales h (h_sigma = sigma_T h), so the cells, hence the map, are the same;
h is stored for unit latents.

OT-start sampling: each seed's latent picks its cell's target, then Heun (edm_sampler) runs from
sigma_T to 0. Targets are either the network's own ODE states at sigma_T (`ode_targets`, no data;
building them costs NFE, reported separately) or training images noised to sigma_T (`data_targets`,
data-dependent: samples may be copies of training images).

Maps are saved as .safetensors (targets, h, labels, target ids) with a JSON header entry; loading
runs no code.
"""

import json
import math

import numpy as np
import torch
import tqdm

import dnnlib
from sampling import denoisers, edm
from sampling.guidance import guided_edm_sampler
from sampling.seeds import latents_for_seeds

#----------------------------------------------------------------------------

FORMAT = 'edm-otmap-safetensors-v1' # value of "format" in the header JSON
METADATA_KEY = 'edm_otmap'          # header metadata entry that holds the JSON
SOURCES = ('ode', 'data')           # where the targets came from

#----------------------------------------------------------------------------
# Assignment and cell masses (pure functions over tensors).

def assign(z, targets, h, batch=4096, chunk=8192):
    """Index of the power cell of each row of z [B, d]: argmax_j <z, y_j> + h_j over targets [M, d].
    Computed in the dtype of `targets` in blocks of batch x chunk scores; ties go to the lowest j."""
    out = torch.empty(len(z), dtype=torch.int64, device=z.device)
    for b in range(0, len(z), batch):
        zb = z[b:b + batch].to(targets.dtype)
        best = torch.full([len(zb)], -math.inf, dtype=targets.dtype, device=z.device)
        for c in range(0, len(targets), chunk):
            value, index = (zb @ targets[c:c + chunk].T + h[c:c + chunk].to(targets.dtype)).max(dim=1)
            better = value > best
            best = torch.where(better, value, best)
            out[b:b + batch] = torch.where(better, index + c, out[b:b + batch])
    return out

def cell_masses(targets, h, num_samples, generator, batch=4096, chunk=8192):
    """Monte Carlo estimate of the N(0, I) mass of every cell from num_samples fresh latents."""
    counts = torch.zeros(len(targets), dtype=torch.float64, device=targets.device)
    for b in range(0, num_samples, batch):
        z = torch.randn([min(batch, num_samples - b), targets.shape[1]], generator=generator, device=targets.device, dtype=targets.dtype)
        counts += torch.bincount(assign(z, targets, h, batch, chunk), minlength=len(targets)).to(torch.float64)
    return counts / num_samples

def mass_report(masses, num_samples):
    """Convergence report: how far cell masses (estimated on num_samples fresh latents) are from 1/M.
    sampling_noise is the standard error of one cell's estimate at mass 1/M: deviations of a few
    times that are what an exact solution would show too."""
    m = len(masses)
    dev = (masses - 1 / m).abs()
    return dict(num_targets=m, eval_samples=num_samples,
                max_mass_deviation=float(dev.max()),      # max_j |w_j - 1/M|
                max_relative_deviation=float(dev.max() * m), # the same in units of 1/M
                mean_relative_deviation=float(dev.mean() * m),
                empty_cells=int((masses == 0).sum()),
                sampling_noise_relative=math.sqrt((1 - 1 / m) * m / num_samples))

#----------------------------------------------------------------------------
# Fitting the potentials.

def fit_potentials(targets, steps=300, samples_per_step=None, lr=0.05, eval_samples=None, seed=0,
                   batch=4096, chunk=8192, dtype=torch.float32, progress=False):
    """Potentials h [M] (float64, mean 0) of the OT map from N(0, I) to the targets [M, ...], and the
    convergence report (mass_report on eval_samples fresh latents, default 50 per cell).

    Adam on the dual with gradient (cell masses - 1/M), each step estimated on samples_per_step
    fresh latents (default 20 per cell); lr is relative to the RMS target norm (the spread of the
    scores <z, y>) and decays to 0 on a cosine. Runs on the device of `targets`."""
    y = targets.flatten(1).to(dtype)
    m = len(y)
    if m < 2:
        raise ValueError(f'an OT map needs at least 2 targets, got {m}')
    if not torch.isfinite(y).all():
        raise ValueError('targets contain NaN or infinite values')
    samples_per_step = samples_per_step or 20 * m
    eval_samples = eval_samples or 50 * m
    gen = torch.Generator(y.device).manual_seed(seed)
    scale = float(y.square().sum(1).mean().sqrt())
    h = torch.zeros(m, dtype=torch.float64, device=y.device, requires_grad=True)
    opt = torch.optim.Adam([h], lr=lr * scale, betas=(0.9, 0.999))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / steps)))
    for _ in tqdm.trange(steps, desc='fitting OT potentials', unit='step', disable=not progress):
        masses = cell_masses(y, h.detach(), samples_per_step, gen, batch, chunk)
        h.grad = masses - 1 / m
        opt.step()
        sched.step()
        with torch.no_grad():
            h -= h.mean()
    h = h.detach()
    return h, mass_report(cell_masses(y, h, eval_samples, gen, batch, chunk), eval_samples)

#----------------------------------------------------------------------------
# The map: targets + potentials + what they are.

class OTMap:
    """Targets [M, C, H, W] at noise level sigma_T, potentials h [M], optional one-hot labels
    [M, label_dim] of the targets, target ids [M] (seeds or dataset indices) and metadata (source,
    fit report, how the targets were made)."""

    def __init__(self, targets, h, sigma_T, source, labels=None, target_ids=None, meta=None):
        if source not in SOURCES:
            raise ValueError(f'unknown target source {source!r}: choose one of {", ".join(SOURCES)}')
        if targets.ndim != 4 or h.shape != targets.shape[:1]:
            raise ValueError(f'targets must be [M, C, H, W] and h [M], got {list(targets.shape)} and {list(h.shape)}')
        if labels is not None and len(labels) != len(targets):
            raise ValueError(f'{len(labels)} labels for {len(targets)} targets')
        self.targets, self.h, self.sigma_T, self.source = targets, h, float(sigma_T), source
        self.labels = labels
        self.target_ids = torch.arange(len(targets)) if target_ids is None else torch.as_tensor(target_ids, dtype=torch.int64)
        self.meta = dict(meta or {})
        self._y64 = None

    def __len__(self):
        return len(self.targets)

    def to(self, device):
        move = lambda t: None if t is None else t.to(device)
        return OTMap(move(self.targets), move(self.h), self.sigma_T, self.source, move(self.labels), self.target_ids, self.meta)

    def assign(self, latents, batch=4096, chunk=8192):
        """Target index of each latent [B, C, H, W]; in float64, so a latent picks the same cell in any batch."""
        if tuple(latents.shape[1:]) != tuple(self.targets.shape[1:]):
            raise ValueError(f'latents of shape {list(latents.shape[1:])} do not fit the OT map\'s targets {list(self.targets.shape[1:])}')
        if self._y64 is None or self._y64.device != latents.device: # converted once, not per batch
            self._y64 = self.targets.flatten(1).to(device=latents.device, dtype=torch.float64)
        return assign(latents.flatten(1).to(torch.float64), self._y64, self.h.to(latents.device, torch.float64), batch, chunk)

    def labels_for(self, latents):
        """Labels of the targets the latents pick (None for a map without labels)."""
        return None if self.labels is None else self.labels[self.assign(latents).to(self.labels.device)].to(latents.device)

    def check_network(self, net):
        """Raise ValueError (one line) if the map was not made for images and labels of this network."""
        shape = [net.img_channels, net.img_resolution, net.img_resolution]
        if list(self.targets.shape[1:]) != shape:
            raise ValueError(f'the OT map holds {"x".join(map(str, self.targets.shape[1:]))} targets (CxHxW), '
                             f'the network makes {"x".join(map(str, shape))} images; build the map for this network')
        label_dim = 0 if self.labels is None else self.labels.shape[1]
        if net.label_dim and label_dim != net.label_dim:
            raise ValueError(f'the network is conditional ({net.label_dim} classes) but the OT map\'s targets have '
                             f'{"no labels" if not label_dim else f"{label_dim} classes"}; build the map with labels')
        if not self.sigma_T <= float(net.sigma_max):
            raise ValueError(f'the OT map\'s sigma_T {self.sigma_T:g} is above the network\'s sigma_max {float(net.sigma_max):g}')

    def save(self, path):
        import safetensors.torch
        header = dict(format=FORMAT, sigma_T=self.sigma_T, source=self.source, **self.meta)
        tensors = dict(targets=self.targets, h=self.h.to(torch.float64), target_ids=self.target_ids)
        if self.labels is not None:
            tensors['labels'] = self.labels
        tensors = {k: v.detach().to('cpu', copy=True).contiguous() for k, v in tensors.items()}
        with dnnlib.util.atomic_write(path) as temp:
            safetensors.torch.save_file(tensors, temp, metadata={METADATA_KEY: json.dumps(header)})

    @staticmethod
    def load(path, device='cpu'):
        import safetensors
        try:
            with safetensors.safe_open(path, framework='pt', device='cpu') as f:
                header = (f.metadata() or {}).get(METADATA_KEY)
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as err:
            raise IOError(f'Cannot read OT map {path}: {" ".join(str(err).split())}. Make one with tools/ot_map.py') from err
        if header is None:
            raise IOError(f'{path} is a .safetensors file but not an OT map (no "{METADATA_KEY}" header); make one with tools/ot_map.py')
        header = json.loads(header)
        if header.pop('format', None) != FORMAT:
            raise IOError(f'{path}: unsupported OT map format (expected {FORMAT!r})')
        sigma_T, source = header.pop('sigma_T'), header.pop('source')
        return OTMap(tensors['targets'], tensors['h'], sigma_T, source, tensors.get('labels'), tensors['target_ids'], header).to(device)

#----------------------------------------------------------------------------
# Targets at sigma_T.

class _Reached(Exception):
    pass

def ode_states(net, latents, class_labels, sigma_T, num_steps=16, rho=7):
    """The network's Heun ODE states at sigma_T from latents: edm_sampler on num_steps noise levels
    from sigma_max down to sigma_T, stopped there (2 * (num_steps - 1) NFE per latent)."""
    reached = []
    def stop(step):
        if step.i == num_steps - 2: # the step that lands on sigma_T, Heun-corrected
            reached.append(step.x_next)
            raise _Reached
    try:
        edm.edm_sampler(net, latents, class_labels, num_steps=num_steps, sigma_min=sigma_T, rho=rho, callback=stop)
    except _Reached:
        return reached[0]
    raise AssertionError('edm_sampler did not reach sigma_T')

def ode_targets(net, seeds, sigma_T, num_steps=16, rho=7, batch=64, device='cpu', progress=False):
    """Data-free targets: (states [M, C, H, W] float32, labels or None, NFE per target) of the
    network's Heun ODE from the latents of `seeds` (drawn as generate.py draws them) to sigma_T."""
    if not 0 < sigma_T < float(net.sigma_max):
        raise ValueError(f'sigma_T must lie in (0, {float(net.sigma_max):g}), the network\'s range; got {sigma_T}')
    counter = denoisers.NFECounter(net)
    states, labels = [], []
    for b in tqdm.trange(0, len(seeds), batch, desc='ODE targets', unit='batch', disable=not progress, total=None):
        latents, class_labels, _ = latents_for_seeds(net, seeds[b:b + batch], device=device)
        with torch.no_grad():
            states.append(ode_states(denoisers.MinBatchNet(counter), latents, class_labels, sigma_T, num_steps, rho).float().cpu())
        labels.append(None if class_labels is None else class_labels.cpu())
    nfe_per_target = counter.nfe // math.ceil(len(seeds) / batch)
    return torch.cat(states), (None if labels[0] is None else torch.cat(labels)), nfe_per_target

def data_targets(images, sigma_T, seed=0):
    """Data-dependent targets: images [M, C, H, W] in [-1, 1] plus sigma_T times standard normal
    noise (drawn in order from one generator seeded with `seed`)."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.as_tensor(images, dtype=torch.float32)
    return images + sigma_T * torch.randn(images.shape, generator=gen)

#----------------------------------------------------------------------------
# OT-start sampling.

def ot_start_sampler(net, latents, ot_map, num_steps=6, return_index=False, **sampler_kwargs):
    """Each latent [B, C, H, W] picks its cell's target at sigma_T; Heun (edm_sampler) then runs
    num_steps noise levels from sigma_T to sigma_min and 0: 2 * num_steps - 1 NFE per image.
    Class labels are the targets' (a conditional network needs a map with labels). Extra keyword
    arguments go to edm_sampler (sigma_min, rho, S_churn, ..., randn_like, callback), or with guidance
    to DG's guided_edm_sampler."""
    for key in ('sigma_max', 'class_labels'):
        if key in sampler_kwargs:
            raise ValueError(f'{key} is set by the OT map in OT-start sampling')
    ot_map.check_network(net)
    if not sampler_kwargs.get('sigma_min', 0) < ot_map.sigma_T:
        raise ValueError(f'sigma_min {sampler_kwargs["sigma_min"]} must be below the OT map\'s sigma_T {ot_map.sigma_T:g}')
    index = ot_map.assign(latents)
    x = ot_map.targets[index.to(ot_map.targets.device)].to(latents.device, torch.float64)
    labels = None if not net.label_dim else ot_map.labels[index.to(ot_map.labels.device)].to(latents.device)
    sigma_T = torch.as_tensor(ot_map.sigma_T, dtype=torch.float64)
    # edm_sampler starts at latents * sigma_max; give it the target divided by round_sigma(sigma_T).
    heun = guided_edm_sampler if sampler_kwargs.get('guidance') is not None else edm.edm_sampler # DG's settings: guided_edm_sampler's
    images = heun(net, x / net.round_sigma(sigma_T), labels, num_steps=num_steps, sigma_max=ot_map.sigma_T, **sampler_kwargs)
    return (images, index) if return_index else images

def map_for_generate(path, net, device, sampler_kwargs):
    """The OT map for generate.py, checked against the network (ValueError/IOError with a one-line
    reason; generate.py checks that its other options go with it). Sets sampler_kwargs['sigma_max'] to sigma_T."""
    ot_map = OTMap.load(path, device=device)
    ot_map.check_network(net)
    sampler_kwargs['sigma_max'] = ot_map.sigma_T
    return ot_map

def as_sampler(ot_map):
    """ot_start_sampler with edm_sampler's call signature (generate.py): the seeds' class labels
    and sigma_max are replaced by the map's."""
    def ot_start(net, latents, class_labels=None, sigma_max=None, **sampler_kwargs):
        return ot_start_sampler(net, latents, ot_map, **sampler_kwargs)
    return ot_start

def describe(ot_map, num_images):
    """One line for generate.py: what the targets are and what building them cost per image."""
    nfe_total = ot_map.meta.get('nfe_total', 0)
    cost = (f'building them took {nfe_total} NFE, {nfe_total / num_images:.2f} per image over these {num_images} images'
            if nfe_total else 'no NFE to build them')
    return f'OT-start from {len(ot_map)} {ot_map.source} targets at sigma_T={ot_map.sigma_T:g} ({ot_map.meta.get("targets_from", "")}); {cost}'

#----------------------------------------------------------------------------
