"""Discriminator Guidance (DG; Kim et al., ICML 2023) at sampling time: the correction a
discriminator adds to a sampler, as a denoiser wrapper that any sampler takes (GuidedDenoiser),
and DG's own boosted Heun sampler with its constants (guided_edm_sampler, DG's EDM-G++).

The discriminator itself (the network, DG's published checkpoints, the safe-format files of
train_discriminator.py, DG's VP SDE) is training/guidance.py: its files name that module.
"""

from typing import Callable, Optional

import numpy as np
import torch

from sampling.denoisers import Step
from sampling.schedules import edm_time_steps
from training.guidance import LOG_RATIO_OUTSIDE_WINDOW, vp_mean_std, vp_time

DG_BOOST_PERIOD = 5         # DG's boosting: raise the churn of "fake" samples every 5th step
DG_BOOST_WEIGHT_PERIOD = 2  # ... and double their correction every 2nd step
DG_BOOST_CHURN = 4.0        # S_churn (with S_noise = 1) of boosted samples

#----------------------------------------------------------------------------
# The correction DG adds to the sampler's slope.

class DiscriminatorGuidance:
    """correction(x, sigma, class_labels) -> (grad, log_ratio) for EDM states x at noise level sigma:
    grad = -sigma^2 * mean_vp * grad_x' log(d / (1 - d)) at the VP state x' = mean_vp * x, VP time
    t = vp_time(sigma); the sampler adds weight * grad / sigma to dx/dsigma (DG's get_grad_log_ratio).

    Time window: no correction where t lies outside [time_min, time_max]. DG decides by the batch's
    smallest t (window='batch', its get_grad_log_ratio); window='sample' decides per sample, so that
    an image does not depend on the others in its batch (the same when all share sigma). There the
    log ratio is reported as +inf (DG: 1e7). The discriminator runs on at least min_batch samples
    (padding with copies), like sampling.MinBatchNet, for the same reason."""

    def __init__(self, classifier, head=None, time_min=0.01, time_max=1.0, window='sample', min_batch=4):
        if window not in ('sample', 'batch'):
            raise ValueError(f'unknown window {window!r}: choose sample or batch')
        if head is None: # a Discriminator module
            self.discriminator = classifier
        else:
            cond = head.num_classes > 0
            self.discriminator = lambda x, t, labels: head(classifier(x, t, feature=True), t, sigmoid=True, condition=labels if cond else None).view(-1)
        self.time_min, self.time_max, self.window, self.min_batch = time_min, time_max, window, min_batch

    def log_ratio(self, x_vp, t, class_labels=None):
        d = self.discriminator(x_vp, t, class_labels).clip(1e-5, 1 - 1e-5)
        return torch.log(d / (1 - d))

    def correction(self, x, sigma, class_labels=None):
        n = x.shape[0]
        sigma = torch.as_tensor(sigma, device=x.device).expand(n) if torch.as_tensor(sigma).ndim == 0 else sigma
        t = vp_time(sigma)
        mean, _ = vp_mean_std(t)
        inside = (t >= self.time_min) & (t <= self.time_max)
        if self.window == 'batch':
            inside[:] = bool(self.time_min <= t.min() <= self.time_max)
        grad = torch.zeros_like(x, dtype=torch.float32)
        log_ratio = torch.full([n], LOG_RATIO_OUTSIDE_WINDOW, dtype=torch.float32, device=x.device)
        if not inside.any():
            return grad, log_ratio
        pad = lambda v: v if v is None or n >= self.min_batch else torch.cat([v, v[-1:].expand(self.min_batch - n, *v.shape[1:])])
        x_vp = pad((mean.reshape(-1, *[1] * (x.ndim - 1)) * x).float()).detach().requires_grad_(True)
        with torch.enable_grad():
            ratio = self.log_ratio(x_vp, pad(t), pad(class_labels))
            (g,) = torch.autograd.grad(ratio.sum(), x_vp)
        factor = -(sigma ** 2 * mean).reshape(-1, *[1] * (x.ndim - 1))
        keep = inside.reshape(-1, *[1] * (x.ndim - 1))
        grad = torch.where(keep, (g[:n].double() * factor).float(), grad)
        log_ratio = torch.where(inside, ratio[:n].detach().float(), log_ratio)
        return grad, log_ratio

class GuidedDenoiser:
    """The network with Discriminator Guidance: D(x; sigma) - weight * correction, so that any
    solver's slope (x - D) / sigma gets weight * correction / sigma, as guided_edm_sampler's dg_slope adds
    it at each Euler evaluation. The AFS step calls no network: unguided."""

    def __init__(self, net, guidance, weight):
        self.net, self.guidance, self.weight = net, guidance, weight

    def __getattr__(self, name):
        return getattr(self.__dict__['net'], name)

    def __call__(self, x, sigma, class_labels=None):
        denoised = self.net(x, sigma, class_labels).to(torch.float64)
        grad, _ = self.guidance.correction(x, sigma, class_labels)
        return denoised - self.weight * grad.to(torch.float64)

#----------------------------------------------------------------------------
# Discriminator Guidance (DG) inside a sampler step.

def per_sample(v):
    """A per-sample [N] tensor as [N, 1, 1, 1] to scale images; scalars unchanged."""
    return v.reshape(-1, 1, 1, 1) if torch.is_tensor(v) and v.ndim == 1 else v

def dg_slope(guidance, d, x, sigma, class_labels, weight, boost=False):
    """(d + weight * correction / sigma, log_ratio): the DG-corrected slope dx/dsigma at (x, sigma).
    boost: double the correction of samples the discriminator finds fake (log ratio < 0)."""
    grad, log_ratio = guidance.correction(x, sigma, class_labels)
    if boost:
        grad = torch.where(per_sample(log_ratio < 0), 2 * grad, grad)
    return d + weight * (grad / per_sample(sigma)), log_ratio

def dg_boost_churn(gamma, S_noise, log_ratio, num_steps):
    """Per-sample (gamma, S_noise) of DG's boosting: samples with log ratio < 0 get churn DG_BOOST_CHURN."""
    fake = log_ratio < 0
    boosted = min(DG_BOOST_CHURN / num_steps, np.sqrt(2) - 1)
    as_vec = lambda v: torch.full(fake.shape, float(v), dtype=torch.float64, device=fake.device)
    return torch.where(fake, as_vec(boosted), as_vec(gamma)), torch.where(fake, as_vec(1.0), as_vec(S_noise))

#----------------------------------------------------------------------------
# DG's EDM-G++ sampler.

def guided_edm_sampler(
    net, latents, class_labels=None, randn_like=torch.randn_like,
    num_steps=18, sigma_min=0.002, sigma_max=80, rho=7,
    S_churn=0, S_min=0, S_max=float('inf'), S_noise=1,
    callback: Optional[Callable[[Step], None]] = None,
    guidance=None, dg_weight=2.0, dg_weight_2nd=0.0, dg_boosting=False,
):
    """DG's EDM-G++ sampler: EDM's Heun sampler (sampling/edm.py's edm_sampler, the same arithmetic)
    with the correction in DG's slope form. With guidance (DiscriminatorGuidance) the slope at the
    Euler evaluation gets dg_weight * correction / sigma, and the one at Heun's evaluation
    dg_weight_2nd * correction / sigma (dg_slope). dg_boosting: DG's boosting (dg_boost_churn;
    randn_like is then called every step). guidance=None or zero weights: edm_sampler's images.
    The slope form, not GuidedDenoiser, so that DG's published numerics hold bit for bit
    (tests/golden/dg) and the boosting sees each evaluation's log ratio."""
    sigma_min = max(sigma_min, net.sigma_min) # the network's supported range
    sigma_max = min(sigma_max, net.sigma_max)
    t_steps = edm_time_steps(num_steps, sigma_min, sigma_max, rho, round_sigma=net.round_sigma, device=latents.device)

    boosting = guidance is not None and dg_boosting
    churn_noise = lambda x: randn_like(x) if S_churn > 0 or boosting else 0 # unused without churn: skip the per-seed draws
    log_ratio = None # DG's log(d / (1 - d)) per sample at the last guided evaluation

    x_next = latents.to(torch.float64) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next

        # Churn: raise the noise level from t_cur to t_hat by adding fresh noise.
        gamma = min(S_churn / num_steps, np.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0
        noise_scale = S_noise
        if boosting and log_ratio is not None and i % DG_BOOST_PERIOD == 0 and S_min <= t_cur <= S_max:
            gamma, noise_scale = dg_boost_churn(gamma, S_noise, log_ratio, num_steps)
        t_hat = net.round_sigma(t_cur + gamma * t_cur)
        x_hat = x_cur + per_sample((t_hat ** 2 - t_cur ** 2).sqrt() * noise_scale) * churn_noise(x_cur)

        # Euler step from t_hat to t_next.
        denoised = net(x_hat, t_hat, class_labels).to(torch.float64)
        d_cur = (x_hat - denoised) / per_sample(t_hat)
        if guidance is not None and dg_weight != 0:
            d_cur, log_ratio = dg_slope(guidance, d_cur, x_hat, t_hat, class_labels, dg_weight,
                                        boost=boosting and i % DG_BOOST_WEIGHT_PERIOD == 0)
        x_next = x_hat + per_sample(t_next - t_hat) * d_cur

        # Heun's correction, except into t_N = 0 where the slope is undefined.
        denoised_prime = d_prime = None
        if i < num_steps - 1:
            denoised_prime = net(x_next, t_next, class_labels).to(torch.float64)
            d_prime = (x_next - denoised_prime) / t_next
            if guidance is not None and dg_weight_2nd != 0:
                d_prime, _ = dg_slope(guidance, d_prime, x_next, t_next, class_labels, dg_weight_2nd)
            x_next = x_hat + per_sample(t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)

        if callback is not None:
            callback(Step(i, t_cur, t_hat, t_next, x_cur, x_hat, x_next, denoised, d_cur, denoised_prime, d_prime))
    return x_next

#----------------------------------------------------------------------------
