"""Samplers of "Elucidating the Design Space of Diffusion-Based Generative Models" (EDM).

edm_sampler is EDM's Algorithm 2 (Heun steps on rho-spaced noise levels, optional stochastic
churn); ablation_sampler is EDM's generalized sampler covering the paper's VP, VE, iDDPM and EDM
settings. Both do their arithmetic in float64 exactly as EDM's generate.py, so the same network,
latents and seeds give the same images. Seeds map to latents and class labels as EDM does it:
one torch.Generator per seed (StackedRandomGenerator, latents_for_seeds).

Analysis tools observe a run through `callback(step)`, called once per step with a SamplerStep,
and count network evaluations by wrapping the network in NFECounter.
"""

from typing import Callable, NamedTuple, Optional
import numpy as np
import torch

#----------------------------------------------------------------------------
# Per-seed random numbers, as EDM's generate.py draws them.

class StackedRandomGenerator:
    """One torch.Generator per seed, so sample i of a batch depends only on seeds[i]."""

    def __init__(self, device, seeds):
        self.generators = [torch.Generator(device).manual_seed(int(seed) % (1 << 32)) for seed in seeds]

    def randn(self, size, **kwargs):
        assert size[0] == len(self.generators)
        return torch.stack([torch.randn(size[1:], generator=gen, **kwargs) for gen in self.generators])

    def randn_like(self, input):
        return self.randn(input.shape, dtype=input.dtype, layout=input.layout, device=input.device)

    def randint(self, *args, size, **kwargs):
        assert size[0] == len(self.generators)
        return torch.stack([torch.randint(*args, size=size[1:], generator=gen, **kwargs) for gen in self.generators])

def latents_for_seeds(net, seeds, device='cpu', class_idx=None):
    """Latents and one-hot class labels for a batch of seeds, drawn as EDM's generate.py does:
    latents first, then a random label from the same generators (drawn even when class_idx forces
    the label, so the stochastic sampler's noise stream stays the same). Returns (latents,
    class_labels or None, rnd); pass randn_like=rnd.randn_like to the sampler."""
    if class_idx is not None and not (0 <= class_idx < net.label_dim):
        raise ValueError(f'class {class_idx} is out of range: the network has {net.label_dim} classes'
                         if net.label_dim else f'class {class_idx} given, but the network is unconditional')
    device = torch.device(device)
    rnd = StackedRandomGenerator(device, seeds)
    latents = rnd.randn([len(seeds), net.img_channels, net.img_resolution, net.img_resolution], device=device)
    class_labels = None
    if net.label_dim:
        class_labels = torch.eye(net.label_dim, device=device)[rnd.randint(net.label_dim, size=[len(seeds)], device=device)]
        if class_idx is not None:
            class_labels[:, :] = 0
            class_labels[:, class_idx] = 1
    return latents, class_labels, rnd

#----------------------------------------------------------------------------
# Observing a run: per-step callback and network-evaluation counting.

class SamplerStep(NamedTuple):
    """What a sampler hands to callback(step) after step i (all tensors float64).
    t_* are the sampler's time variable: the noise level itself for edm_sampler, t of the chosen
    schedule sigma(t) for ablation_sampler; x_* are the ODE states (scaled by s(t) under VP scaling)."""
    i: int                                  # step index 0 .. num_steps-1
    t_cur: torch.Tensor                     # start of the step
    t_hat: torch.Tensor                     # after stochastic churn (== t_cur without churn)
    t_next: torch.Tensor                    # end of the step (0 after the last step)
    x_cur: torch.Tensor                     # state at t_cur
    x_hat: torch.Tensor                     # state at t_hat (churn noise added)
    x_next: torch.Tensor                    # state at t_next (after the correction, if any)
    denoised: torch.Tensor                  # D(x_hat; sigma(t_hat)), the denoiser's image estimate
    d_cur: torch.Tensor                     # dx/dt at (x_hat, t_hat)
    denoised_prime: Optional[torch.Tensor]  # second evaluation of Heun's step, None if no correction
    d_prime: Optional[torch.Tensor]         # dx/dt at the Euler prediction, None if no correction

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

#----------------------------------------------------------------------------
# Time step discretizations (float64, in the operation order of EDM).

def edm_time_steps(num_steps=18, sigma_min=0.002, sigma_max=80, rho=7, round_sigma=None, device=None):
    """EDM's noise levels (paper eq. 5): t_0 = sigma_max > ... > t_{N-1} = sigma_min, spaced
    uniformly in sigma^(1/rho), each passed through round_sigma, followed by t_N = 0."""
    if num_steps < 2:
        raise ValueError(f'num_steps must be at least 2, got {num_steps}')
    step_indices = torch.arange(num_steps, dtype=torch.float64, device=device)
    t_steps = (sigma_max ** (1 / rho) + step_indices / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    if round_sigma is not None:
        t_steps = round_sigma(t_steps)
    return torch.cat([t_steps, torch.zeros_like(t_steps[:1])])

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
        return edm_time_steps(num_steps, sigma_min, sigma_max, rho, device=device)[:-1]
    raise ValueError(f'unknown discretization {discretization!r}: choose vp, ve, iddpm or edm')

def vp_betas(sigma_min, sigma_max, epsilon_s=1e-3):
    """beta_d, beta_min of the VP schedule that spans exactly [sigma_min, sigma_max] over t in [epsilon_s, 1]."""
    beta_d = 2 * (np.log(sigma_min ** 2 + 1) / epsilon_s - np.log(sigma_max ** 2 + 1)) / (epsilon_s - 1)
    beta_min = np.log(sigma_max ** 2 + 1) - 0.5 * beta_d
    return beta_d, beta_min

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
# Discriminator Guidance (DG) inside a sampler step.

DG_BOOST_PERIOD = 5         # DG's boosting: raise the churn of "fake" samples every 5th step
DG_BOOST_WEIGHT_PERIOD = 2  # ... and double their correction every 2nd step
DG_BOOST_CHURN = 4.0        # S_churn (with S_noise = 1) of boosted samples

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
# EDM sampler (Algorithm 2).

def edm_sampler(
    net, latents, class_labels=None, randn_like=torch.randn_like,
    num_steps=18, sigma_min=0.002, sigma_max=80, rho=7,
    S_churn=0, S_min=0, S_max=float('inf'), S_noise=1,
    callback: Optional[Callable[[SamplerStep], None]] = None,
    guidance=None, dg_weight=2.0, dg_weight_2nd=0.0, dg_boosting=False,
):
    """Heun's 2nd order method on EDM's noise levels; 2*num_steps-1 network evaluations.
    S_churn > 0 adds noise (gamma = min(S_churn/num_steps, sqrt(2)-1)) at noise levels in [S_min, S_max].
    With S_churn > 0, randn_like is called once every step, also where gamma = 0, as EDM does, so
    the noise stream stays EDM's; with S_churn = 0 it is not called (the noise would be multiplied by 0).

    Discriminator Guidance (DG's EDM-G++ sampler): with guidance (training.guidance.DiscriminatorGuidance)
    the slope at the Euler evaluation gets dg_weight * correction / sigma, and the one at Heun's
    evaluation dg_weight_2nd * correction / sigma (see dg_slope). dg_boosting: DG's boosting
    (dg_boost_churn; randn_like is then called every step). guidance=None: EDM's sampler, unchanged."""
    sigma_min = max(sigma_min, net.sigma_min) # the network's supported range
    sigma_max = min(sigma_max, net.sigma_max)
    t_steps = edm_time_steps(num_steps, sigma_min, sigma_max, rho, round_sigma=net.round_sigma, device=latents.device)

    boosting = guidance is not None and dg_boosting
    churn_noise = lambda x: randn_like(x) if S_churn > 0 or boosting else 0 # unused without churn: skip the per-seed draws
    log_ratio = None # DG's log(d / (1 - d)) per sample at the last guided evaluation

    x_next = latents.to(torch.float64) * t_steps[0]
    churned = [S_min <= t <= S_max for t in t_steps.tolist()] # read once: a comparison of a CUDA t_cur would sync twice a step
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next

        # Churn: raise the noise level from t_cur to t_hat by adding fresh noise.
        gamma = min(S_churn / num_steps, np.sqrt(2) - 1) if churned[i] else 0
        noise_scale = S_noise
        if boosting and log_ratio is not None and i % DG_BOOST_PERIOD == 0 and churned[i]:
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
            callback(SamplerStep(i, t_cur, t_hat, t_next, x_cur, x_hat, x_next, denoised, d_cur, denoised_prime, d_prime))
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
    callback: Optional[Callable[[SamplerStep], None]] = None,
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
            callback(SamplerStep(i, t_cur, t_hat, t_next, x_cur, x_hat, x_next, denoised, d_cur, denoised_prime, d_prime))
    return x_next

#----------------------------------------------------------------------------
