"""Noise levels: the one place where samplers' sigmas are computed.

EDM's rho-spaced levels are one function, edm_sigmas, computed in float64 (EDM's own sampler and
the ablation sampler: the exactness contract of sampling/edm.py) or in float32 and widened
(diff-sampler's levels bit for bit, for the few-step solvers of sampling/solvers.py, so that their
results compare with its published numbers). The rest: EDM's ablation discretizations and noise
schedules (float64, in the operation order of EDM), and the few-step discretizations (log-SNR,
time-uniform) with diff-sampler's float32 VP fit. Every function returns a 1-D float64 tensor,
sigma_max first.
"""

import json
import os

import numpy as np
import torch

#----------------------------------------------------------------------------
# EDM's levels (paper eq. 5).

def edm_sigmas(num_steps, sigma_min=0.002, sigma_max=80, rho=7, device=None, dtype=torch.float32):
    """EDM's noise levels sigma_max > ... > sigma_min, uniform in sigma^(1/rho), computed in dtype
    and returned as float64: torch.float32 (the default) is diff-sampler's arithmetic, which the
    few-step solvers use, torch.float64 EDM's (edm_sampler, ablation_sampler)."""
    if num_steps < 2:
        raise ValueError(f'num_steps must be at least 2, got {num_steps}')
    fraction = torch.arange(num_steps, dtype=dtype, device=device) / (num_steps - 1)
    return ((sigma_max ** (1 / rho) + fraction * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho).double()

def edm_time_steps(num_steps=18, sigma_min=0.002, sigma_max=80, rho=7, round_sigma=None, device=None):
    """edm_sampler's time steps: edm_sigmas in float64, each passed through round_sigma, then t_N = 0."""
    t_steps = edm_sigmas(num_steps, sigma_min, sigma_max, rho, device=device, dtype=torch.float64)
    if round_sigma is not None:
        t_steps = round_sigma(t_steps)
    return torch.cat([t_steps, torch.zeros_like(t_steps[:1])])

#----------------------------------------------------------------------------
# EDM's ablation discretizations, noise schedules and scalings (Table 1; float64).

def iddpm_noise_levels(M=1000, C_1=0.001, C_2=0.008, device=None):
    """The M+1 noise levels u_M=0 < ... < u_0 of improved DDPM's cosine schedule (EDM Table 1).
    Computed step by step like EDM, whose float32 alpha-bar ratios this reproduces bit for bit."""
    u = torch.zeros(M + 1, dtype=torch.float64, device=device)
    alpha_bar = lambda j: (0.5 * np.pi * j / M / (C_2 + 1)).sin() ** 2
    for j in torch.arange(M, 0, -1, device=device):
        u[j - 1] = ((u[j] ** 2 + 1) / (alpha_bar(j - 1) / alpha_bar(j)).clip(min=C_1) - 1).sqrt()
    return u

def vp_sigma(beta_d, beta_min):
    return lambda t: (np.e ** (0.5 * beta_d * (t ** 2) + beta_min * t) - 1) ** 0.5

def vp_betas(sigma_min, sigma_max, epsilon_s=1e-3):
    """beta_d, beta_min of the VP schedule that spans exactly [sigma_min, sigma_max] over t in [epsilon_s, 1]."""
    beta_d = 2 * (np.log(sigma_min ** 2 + 1) / epsilon_s - np.log(sigma_max ** 2 + 1)) / (epsilon_s - 1)
    beta_min = np.log(sigma_max ** 2 + 1) - 0.5 * beta_d
    return beta_d, beta_min

def ablation_sigma_steps(num_steps, sigma_min, sigma_max, rho=7, discretization='edm',
                         epsilon_s=1e-3, C_1=0.001, C_2=0.008, M=1000, device=None):
    """The noise levels sigma_0 > ... > sigma_{N-1} of EDM's four discretizations (before rounding)."""
    if num_steps < 2:
        raise ValueError(f'num_steps must be at least 2, got {num_steps}')
    step_indices = torch.arange(num_steps, dtype=torch.float64, device=device)
    if discretization == 'vp':
        beta_d, beta_min = vp_betas(sigma_min, sigma_max, epsilon_s)
        return vp_sigma(beta_d, beta_min)(1 + step_indices / (num_steps - 1) * (epsilon_s - 1))
    if discretization == 've':
        return ((sigma_max ** 2) * ((sigma_min ** 2 / sigma_max ** 2) ** (step_indices / (num_steps - 1)))).sqrt()
    if discretization == 'iddpm':
        u = iddpm_noise_levels(M=M, C_1=C_1, C_2=C_2, device=device)
        u = u[torch.logical_and(u >= sigma_min, u <= sigma_max)]
        if len(u) == 0:
            raise ValueError(f'no iDDPM noise level lies in [sigma_min, sigma_max] = [{sigma_min}, {sigma_max}]')
        return u[((len(u) - 1) / (num_steps - 1) * step_indices).round().to(torch.int64)]
    if discretization == 'edm':
        return edm_sigmas(num_steps, sigma_min, sigma_max, rho, device=device, dtype=torch.float64)
    raise ValueError(f'unknown discretization {discretization!r}: choose vp, ve, iddpm or edm')

def noise_schedule(schedule, beta_d=None, beta_min=None):
    """(sigma(t), sigma'(t), sigma^-1(sigma)) of the vp, ve or linear noise schedule."""
    if schedule == 'vp':
        sigma = vp_sigma(beta_d, beta_min)
        sigma_deriv = lambda t: 0.5 * (beta_min + beta_d * t) * (sigma(t) + 1 / sigma(t))
        sigma_inv = lambda sigma: ((beta_min ** 2 + 2 * beta_d * (sigma ** 2 + 1).log()).sqrt() - beta_min) / beta_d
        return sigma, sigma_deriv, sigma_inv
    if schedule == 've':
        return (lambda t: t.sqrt()), (lambda t: 0.5 / t.sqrt()), (lambda sigma: sigma ** 2)
    if schedule == 'linear':
        return (lambda t: t), (lambda t: 1), (lambda sigma: sigma)
    raise ValueError(f'unknown schedule {schedule!r}: choose vp, ve or linear')

def signal_scaling(scaling, sigma, sigma_deriv):
    """(s(t), s'(t)) of the vp or none signal scaling."""
    if scaling == 'vp':
        s = lambda t: 1 / (1 + sigma(t) ** 2).sqrt()
        return s, (lambda t: -sigma(t) * sigma_deriv(t) * (s(t) ** 3))
    if scaling == 'none':
        return (lambda t: 1), (lambda t: 0)
    raise ValueError(f'unknown scaling {scaling!r}: choose vp or none')

#----------------------------------------------------------------------------
# The few-step solvers' discretizations: diff-sampler's levels bit for bit (float32, then widened).

VP_EPSILON = 1e-3 # smallest time of the VP SDE fits

def diff_sampler_vp(sigma_min=0.002, sigma_max=80):
    """(beta_d, beta_min) of the VP SDE through sigma_min at t=1e-3 and sigma_max at t=1, fitted in
    float32 as diff-sampler does: its log(1 + sigma_min^2) is 1% off at sigma_min=0.002, which moves
    its time-uniform levels and DEIS weights; kept, so that both match diff-sampler's. Python floats
    (exactly the float32 values)."""
    return tuple(float(beta) for beta in vp_betas(np.float32(sigma_min), np.float32(sigma_max), VP_EPSILON))

def logsnr_sigmas(num_steps, sigma_min=0.002, sigma_max=80, device=None):
    """Uniform in log-SNR = -2 log(sigma) (DPM-Solver's choice for small images)."""
    lam = lambda sigma: -torch.tensor(sigma, dtype=torch.float32).log().item()
    return torch.linspace(lam(sigma_max), lam(sigma_min), num_steps, dtype=torch.float32, device=device).neg().exp().double()

def time_uniform_sigmas(num_steps, sigma_min=0.002, sigma_max=80, rho=1, device=None):
    """Uniform in t^(1/rho) of the VP SDE fitted to [sigma_min, sigma_max] over t in [1e-3, 1]
    (DPM-Solver's time-uniform levels at rho=1; rho is diff-sampler's exponent). The float32 fit
    (diff_sampler_vp) ends these levels at 0.0020132 for sigma_min=0.002, as diff-sampler's."""
    fraction = torch.arange(num_steps, dtype=torch.float32, device=device) / (num_steps - 1)
    t = (1 + fraction * (VP_EPSILON ** (1 / rho) - 1)) ** rho
    return vp_sigma(*diff_sampler_vp(sigma_min, sigma_max))(t).double()

DISCRETIZATIONS = ('edm', 'logsnr', 'time-uniform')

def get_sigmas(disc, num_steps, sigma_min=0.002, sigma_max=80, rho=7, device=None):
    """The few-step levels of discretization edm|logsnr|time-uniform (rho: EDM's rho, time-uniform's exponent)."""
    if num_steps < 2:
        raise ValueError(f'need at least 2 noise levels, got {num_steps}')
    if disc == 'edm':
        return edm_sigmas(num_steps, sigma_min, sigma_max, rho, device=device)
    if disc == 'logsnr':
        return logsnr_sigmas(num_steps, sigma_min, sigma_max, device=device)
    if disc == 'time-uniform':
        return time_uniform_sigmas(num_steps, sigma_min, sigma_max, rho, device=device)
    raise ValueError(f'unknown discretization {disc!r}: choose {", ".join(DISCRETIZATIONS)}')

def check_sigmas(sigmas, device=None):
    """sigmas as a float64 tensor, or ValueError unless they are finite, positive, strictly decreasing."""
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64, device=device)
    if sigmas.ndim != 1 or len(sigmas) < 2:
        raise ValueError(f'need a list of at least 2 noise levels, got {sigmas.tolist()}')
    if not (torch.isfinite(sigmas).all() and (sigmas > 0).all()):
        raise ValueError(f'noise levels must be positive numbers, got {sigmas.tolist()}')
    if not (sigmas[1:] < sigmas[:-1]).all():
        raise ValueError(f'noise levels must be strictly decreasing (sigma_max first), got {sigmas.tolist()}')
    return sigmas

def read_sigmas(value):
    """Noise levels from text: 'a,b,c,...' or a JSON file holding a list or {"sigmas": [...]}
    (tools/schedule_search.py's output). Not checked: see check_sigmas."""
    if value.endswith('.json') or os.path.isfile(value):
        try:
            with open(value) as f:
                data = json.load(f)
        except (OSError, ValueError) as e:
            raise ValueError(f'cannot read noise levels from {value}: {e}') from e
        data = data.get('sigmas') if isinstance(data, dict) else data
        if not isinstance(data, list) or not all(isinstance(v, (int, float)) for v in data):
            raise ValueError(f'{value} holds no list of noise levels: give a JSON list or {{"sigmas": [...]}}')
        return [float(v) for v in data]
    try:
        return [float(v) for v in value.split(',')]
    except ValueError:
        raise ValueError(f'cannot read {value!r} as noise levels: give numbers like 80,10,1,0.002 or a JSON file') from None

#----------------------------------------------------------------------------
