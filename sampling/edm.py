"""Samplers of "Elucidating the Design Space of Diffusion-Based Generative Models" (EDM), as EDM
wrote them: edm_sampler is EDM's Algorithm 2 (Heun steps on rho-spaced noise levels, optional
stochastic churn); ablation_sampler is EDM's generalized sampler covering the paper's VP, VE, iDDPM
and EDM settings. Both do their arithmetic in float64 exactly as EDM's generate.py, so the same
network, latents and seeds give the same images (tests/golden/sampler: the exactness contract).
They keep EDM's signature fn(net, latents, class_labels, randn_like, ...); seeds map to latents as
in EDM (sampling/seeds.py). Analysis tools observe a run through callback(step), called once per
step with a sampling.denoisers.Step. Discriminator Guidance's own Heun sampler (EDM-G++) is
sampling/guidance.py's guided_edm_sampler.
"""

from typing import Callable, Optional

import numpy as np
import torch

from sampling.denoisers import Step
from sampling.schedules import ablation_sigma_steps, edm_time_steps, noise_schedule, signal_scaling, vp_betas, vp_sigma

#----------------------------------------------------------------------------
# EDM sampler (Algorithm 2).

def edm_sampler(
    net, latents, class_labels=None, randn_like=torch.randn_like,
    num_steps=18, sigma_min=0.002, sigma_max=80, rho=7,
    S_churn=0, S_min=0, S_max=float('inf'), S_noise=1,
    callback: Optional[Callable[[Step], None]] = None,
):
    """Heun's 2nd order method on EDM's noise levels; 2*num_steps-1 network evaluations.
    S_churn > 0 adds noise (gamma = min(S_churn/num_steps, sqrt(2)-1)) at noise levels in [S_min, S_max].
    With S_churn > 0, randn_like is called once every step, also where gamma = 0, as EDM does, so
    the noise stream stays EDM's; with S_churn = 0 it is not called (the noise would be multiplied by 0)."""
    sigma_min = max(sigma_min, net.sigma_min) # the network's supported range
    sigma_max = min(sigma_max, net.sigma_max)
    t_steps = edm_time_steps(num_steps, sigma_min, sigma_max, rho, round_sigma=net.round_sigma, device=latents.device)

    churn_noise = lambda x: randn_like(x) if S_churn > 0 else 0 # unused without churn: skip the per-seed draws

    x_next = latents.to(torch.float64) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next

        # Churn: raise the noise level from t_cur to t_hat by adding fresh noise.
        gamma = min(S_churn / num_steps, np.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0
        t_hat = net.round_sigma(t_cur + gamma * t_cur)
        x_hat = x_cur + (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise * churn_noise(x_cur)

        # Euler step from t_hat to t_next.
        denoised = net(x_hat, t_hat, class_labels).to(torch.float64)
        d_cur = (x_hat - denoised) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur

        # Heun's correction, except into t_N = 0 where the slope is undefined.
        denoised_prime = d_prime = None
        if i < num_steps - 1:
            denoised_prime = net(x_next, t_next, class_labels).to(torch.float64)
            d_prime = (x_next - denoised_prime) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)

        if callback is not None:
            callback(Step(i, t_cur, t_hat, t_next, x_cur, x_hat, x_next, denoised, d_cur, denoised_prime, d_prime))
    return x_next

#----------------------------------------------------------------------------
# Generalized ablation sampler: the superset of the paper's samplers (Table 1).

def ablation_default_sigmas(discretization, epsilon_s=1e-3):
    """EDM's default (sigma_min, sigma_max) per discretization; VP: the original VP SDE
    (beta_d=19.9, beta_min=0.1) at t = epsilon_s and t = 1."""
    vp = vp_sigma(beta_d=19.9, beta_min=0.1)
    return {'vp': (vp(epsilon_s), vp(1)), 've': (0.02, 100), 'iddpm': (0.002, 81), 'edm': (0.002, 80)}[discretization]

def ablation_sampler(
    net, latents, class_labels=None, randn_like=torch.randn_like,
    num_steps=18, sigma_min=None, sigma_max=None, rho=7,
    solver='heun', discretization='edm', schedule='linear', scaling='none',
    epsilon_s=1e-3, C_1=0.001, C_2=0.008, M=1000, alpha=1,
    S_churn=0, S_min=0, S_max=float('inf'), S_noise=1,
    callback: Optional[Callable[[Step], None]] = None,
):
    """Solver euler|heun (alpha: where Heun's second evaluation sits, 1 = trapezoidal),
    discretization vp|ve|iddpm|edm of the noise levels, noise schedule sigma(t) vp|ve|linear,
    signal scaling s(t) vp|none. Default sigma range per discretization: ablation_default_sigmas.
    Heun: 2*num_steps-1 network evaluations; Euler: num_steps."""
    if solver not in ('euler', 'heun'):
        raise ValueError(f'unknown solver {solver!r}: choose euler or heun')
    if solver == 'heun' and not 0 < alpha <= 1:
        raise ValueError(f'alpha must be in (0, 1] for the heun solver, got {alpha}')
    if discretization not in ('vp', 've', 'iddpm', 'edm'):
        raise ValueError(f'unknown discretization {discretization!r}: choose vp, ve, iddpm or edm')
    default_min, default_max = ablation_default_sigmas(discretization, epsilon_s)
    sigma_min = default_min if sigma_min is None else sigma_min
    sigma_max = default_max if sigma_max is None else sigma_max
    sigma_min = max(sigma_min, net.sigma_min) # the network's supported range
    sigma_max = min(sigma_max, net.sigma_max)

    # The VP schedule is fitted to the sigma range, whichever discretization picks the levels.
    vp_beta_d, vp_beta_min = vp_betas(sigma_min, sigma_max, epsilon_s)
    sigma_steps = ablation_sigma_steps(num_steps, sigma_min, sigma_max, rho, discretization,
                                       epsilon_s=epsilon_s, C_1=C_1, C_2=C_2, M=M, device=latents.device)
    sigma, sigma_deriv, sigma_inv = noise_schedule(schedule, vp_beta_d, vp_beta_min)
    s, s_deriv = signal_scaling(scaling, sigma, sigma_deriv)
    t_steps = sigma_inv(net.round_sigma(sigma_steps))
    t_steps = torch.cat([t_steps, torch.zeros_like(t_steps[:1])]) # t_N = 0

    # dx/dt of the probability flow ODE with schedule sigma(t) and scaling s(t) (EDM eq. 4).
    slope = lambda x, t, denoised: (sigma_deriv(t) / sigma(t) + s_deriv(t) / s(t)) * x - sigma_deriv(t) * s(t) / sigma(t) * denoised

    churn_noise = lambda x: randn_like(x) if S_churn > 0 else 0 # unused without churn: skip the per-seed draws

    t_next = t_steps[0]
    x_next = latents.to(torch.float64) * (sigma(t_next) * s(t_next))
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next

        # Churn: raise the noise level from sigma(t_cur) to sigma(t_hat).
        gamma = min(S_churn / num_steps, np.sqrt(2) - 1) if S_min <= sigma(t_cur) <= S_max else 0
        t_hat = sigma_inv(net.round_sigma(sigma(t_cur) + gamma * sigma(t_cur)))
        x_hat = s(t_hat) / s(t_cur) * x_cur + (sigma(t_hat) ** 2 - sigma(t_cur) ** 2).clip(min=0).sqrt() * s(t_hat) * S_noise * churn_noise(x_cur)

        # Euler step.
        h = t_next - t_hat
        denoised = net(x_hat / s(t_hat), sigma(t_hat), class_labels).to(torch.float64)
        d_cur = slope(x_hat, t_hat, denoised)
        x_prime = x_hat + alpha * h * d_cur
        t_prime = t_hat + alpha * h

        # Second order correction (not into t_N = 0).
        denoised_prime = d_prime = None
        if solver == 'euler' or i == num_steps - 1:
            x_next = x_hat + h * d_cur
        else:
            denoised_prime = net(x_prime / s(t_prime), sigma(t_prime), class_labels).to(torch.float64)
            d_prime = slope(x_prime, t_prime, denoised_prime)
            x_next = x_hat + h * ((1 - 1 / (2 * alpha)) * d_cur + 1 / (2 * alpha) * d_prime)

        if callback is not None:
            callback(Step(i, t_cur, t_hat, t_next, x_cur, x_hat, x_next, denoised, d_cur, denoised_prime, d_prime))
    return x_next

#----------------------------------------------------------------------------
