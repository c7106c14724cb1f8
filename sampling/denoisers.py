"""What every sampler shares: the one step record it hands to callback(step), and the wrappers a
denoiser may wear (they keep the network's call D(x, sigma, class_labels) and its attributes).

Samplers here have k-diffusion's shape, a function of the denoiser, the state and the noise
levels: the few-step solvers take them as fn(denoiser, x, sigmas, class_labels, ...); EDM's own
samplers (sampling/edm.py) keep EDM's signature fn(net, latents, class_labels, randn_like, ...)
and compute their levels themselves (sampling/generate.py's make_sampler adapts both)."""

from typing import NamedTuple, Optional

import torch

class Step(NamedTuple):
    """What a sampler hands to callback(step) after step i (float64 tensors).
    t_* are the sampler's time variable: the noise level itself for edm_sampler and the few-step
    solvers, t of the chosen schedule sigma(t) for ablation_sampler; x_* are the ODE states (scaled
    by s(t) under VP scaling). Single-evaluation steps (the few-step solvers) have t_hat == t_cur,
    x_hat == x_cur and no second evaluation; sigma, sigma_next and x name their fields as the
    solvers' step record did."""
    i: int                                  # step index 0 .. num_steps-1
    t_cur: torch.Tensor                     # start of the step
    t_hat: torch.Tensor                     # after stochastic churn (== t_cur without churn)
    t_next: torch.Tensor                    # end of the step (0 after the last step of EDM's samplers)
    x_cur: torch.Tensor                     # state at t_cur
    x_hat: torch.Tensor                     # state at t_hat (churn noise added)
    x_next: torch.Tensor                    # state at t_next (after the correction, if any)
    denoised: torch.Tensor                  # the denoiser's image estimate the step used
    d_cur: Optional[torch.Tensor] = None    # dx/dt at (x_hat, t_hat); None for multistep solvers, whose update is not one slope
    denoised_prime: Optional[torch.Tensor] = None # second evaluation of Heun's step, None if no correction
    d_prime: Optional[torch.Tensor] = None  # dx/dt at the Euler prediction, None if no correction

    @property
    def sigma(self):
        return self.t_cur

    @property
    def sigma_next(self):
        return self.t_next

    @property
    def x(self):
        return self.x_cur

class NFECounter:
    """Wraps a network: counts evaluations (nfe) and records the noise level of each (sigmas).
    With dry_run=True the network is not evaluated (the denoiser returns zeros), which gives a
    sampler's NFE and noise levels at no cost: samplers' noise levels never depend on the images."""

    def __init__(self, net, dry_run=False):
        self.net = net
        self.dry_run = dry_run
        self.nfe = 0
        self.sigmas = []

    def __getattr__(self, name): # sigma_min, sigma_max, round_sigma, label_dim, ... of the network
        return getattr(self.__dict__['net'], name)

    def __call__(self, x, sigma, *args, **kwargs):
        self.nfe += 1
        self.sigmas.append(torch.as_tensor(sigma, dtype=torch.float64).reshape(-1)[0].item())
        return torch.zeros_like(x) if self.dry_run else self.net(x, sigma, *args, **kwargs)

class MinBatchNet:
    """Evaluates the network on at least min_batch samples, padding with copies of the last one.
    CPU BLAS libraries switch to other kernels, with other rounding, for batches of one or two;
    padding keeps every sample on the same kernels, so an image does not depend on how many
    others share its batch (measured on CPU, see docs/sampling.md; GPU libraries make no such promise)."""

    def __init__(self, net, min_batch=4):
        self.net = net
        self.min_batch = min_batch

    def __getattr__(self, name):
        return getattr(self.__dict__['net'], name)

    def __call__(self, x, sigma, class_labels=None, **kwargs):
        n = x.shape[0]
        if n >= self.min_batch:
            return self.net(x, sigma, class_labels, **kwargs)
        pad = lambda t: t if t is None or torch.as_tensor(t).ndim == 0 else torch.cat([t, t[-1:].expand(self.min_batch - n, *t.shape[1:])])
        return self.net(pad(x), pad(sigma), pad(class_labels), **{k: pad(v) for k, v in kwargs.items()})[:n]

def trace_sampler(net, sampler_fn, device='cpu', **sampler_kwargs):
    """(nfe, sigmas): how often and at which noise levels sampler_fn would evaluate net."""
    probe = NFECounter(net, dry_run=True)
    sampler_fn(probe, torch.zeros([1, 1, 1, 1], device=device), None, randn_like=torch.zeros_like, **sampler_kwargs)
    return probe.nfe, probe.sigmas
