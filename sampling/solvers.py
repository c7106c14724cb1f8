"""Few-step ODE solvers for EDM's probability flow ODE dx/dsigma = (x - D(x; sigma)) / sigma, and
the noise levels they step through; beside them k-diffusion's stochastic euler_ancestral and
dpmpp_2m_sde, which add fresh noise every step (drawn from the per-seed generators).

Every solver is a function solver(net, x, sigmas, class_labels=None, ...) -> x at sigmas[-1], in the
style of k-diffusion's sampling.py: x is the state at sigmas[0] (already scaled: latents * sigmas[0]),
sigmas a strictly decreasing 1-D tensor ending at sigma_min (no final denoising to 0). Each network
evaluation D(x; sigma) serves one step, so a multistep solver costs len(sigmas) - 1 evaluations
(dpm_solver_2: two per step); with afs=True the first slope is x / sqrt(1 + sigma^2) instead of a
network call (AFS, the analytical first step), one evaluation fewer. The arithmetic is float64, as in
sampling/edm.py. Algorithms and defaults are those of zju-pi/diff-sampler (gits-main/solvers.py),
checked against it in tests/golden/solvers; one deviation: DPM-Solver++ and UniPC run without its
dynamic thresholding of the data prediction (the published solvers keep it off for pixel models).

The noise levels are sampling/schedules.py's (get_sigmas: edm_sigmas in diff-sampler's float32,
logsnr_sigmas, time_uniform_sigmas, or any list through check_sigmas). sample() runs a solver by
name from latents, in EDM's samplers' signature, and adds Discriminator Guidance to every network
evaluation (sampling/guidance.py's GuidedDenoiser). callback(step) gets a sampling.denoisers.Step.
"""

from typing import Callable, Optional

import numpy as np
import torch

from sampling.denoisers import Step
from sampling.guidance import GuidedDenoiser
from sampling.schedules import check_sigmas, diff_sampler_vp, noise_schedule
from training.errors import Opt, OptionError

#----------------------------------------------------------------------------
# One evaluation: the data prediction D(x; sigma) and the slope dx/dsigma.

def denoise(net, x, sigma, class_labels, analytic=False):
    """(D(x; sigma), dx/dsigma). analytic: AFS's first slope x / sqrt(1 + sigma^2), no network call:
    at sigma_max the state is nearly all noise, so the noise estimate is x scaled to unit variance."""
    if analytic:
        d = x / (1 + sigma ** 2).sqrt()
        return x - sigma * d, d
    denoised = net(x, sigma, class_labels).to(torch.float64)
    return denoised, (x - denoised) / sigma

def report(callback, i, sigmas, x, denoised, x_next):
    """callback(Step) after step i: one evaluation at sigmas[i] (no churn, no second evaluation)."""
    if callback is not None:
        callback(Step(i, sigmas[i], sigmas[i], sigmas[i + 1], x, x, x_next, denoised))

#----------------------------------------------------------------------------
# Single-step solvers.

def euler(net, x, sigmas, class_labels=None, afs=False, callback=None):
    """Euler's method (DDIM): one evaluation per step."""
    for i in range(len(sigmas) - 1):
        denoised, d = denoise(net, x, sigmas[i], class_labels, analytic=afs and i == 0)
        x_next = x + (sigmas[i + 1] - sigmas[i]) * d
        report(callback, i, sigmas, x, denoised, x_next)
        x = x_next
    return x

def dpm_solver_2(net, x, sigmas, class_labels=None, afs=False, r=0.5, callback=None):
    """DPM-Solver-2: a second evaluation at sigma^(1-r) * sigma_next^r per step (r=0.5: the midpoint
    in log sigma); two evaluations per step."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised, d = denoise(net, x, sigma, class_labels, analytic=afs and i == 0)
        sigma_mid = (sigma_next ** r) * (sigma ** (1 - r))
        _, d_mid = denoise(net, x + (sigma_mid - sigma) * d, sigma_mid, class_labels)
        x_next = x + (sigma_next - sigma) * ((1 / (2 * r)) * d_mid + (1 - 1 / (2 * r)) * d)
        report(callback, i, sigmas, x, denoised, x_next)
        x = x_next
    return x

#----------------------------------------------------------------------------
# Adams-Bashforth on the slopes: iPNDM (fixed-step weights), iPNDM-v (variable-step), DEIS (tAB).
# Each step uses the current slope and up to order-1 previous ones; the first steps warm up with
# lower orders.

def linear_multistep(net, x, sigmas, class_labels, order, afs, callback, weights):
    """x_next = x + sum_k w_k * d_{i-k} with w = weights(i, k) for k = 0..k-1 (current slope first)."""
    slopes = [] # newest first
    for i in range(len(sigmas) - 1):
        denoised, d = denoise(net, x, sigmas[i], class_labels, analytic=afs and i == 0)
        slopes = [d] + slopes[:order - 1]
        x_next = x + sum(w * s for w, s in zip(weights(i, len(slopes)), slopes))
        report(callback, i, sigmas, x, denoised, x_next)
        x = x_next
    return x

# Adams-Bashforth weights for equal steps, current slope first, and their common denominator.
ADAMS_BASHFORTH = {1: ([1], 1), 2: ([3, -1], 2), 3: ([23, -16, 5], 12), 4: ([55, -59, 37, -9], 24)}

def ipndm(net, x, sigmas, class_labels=None, order=4, afs=False, callback=None):
    """iPNDM: Adams-Bashforth of order up to 4 with the equal-step weights on any steps."""
    s = sigmas.tolist()
    def weights(i, k):
        numerators, denominator = ADAMS_BASHFORTH[k]
        return [(s[i + 1] - s[i]) * n / denominator for n in numerators]
    return linear_multistep(net, x, sigmas, class_labels, order, afs, callback, weights)

def ipndm_v_weights(h):
    """iPNDM-v's weights of slopes d_i, d_{i-1}, ... for the step lengths h = [h_i, h_{i-1}, ...]
    (h_i = sigma_{i+1} - sigma_i), as diff-sampler computes them (multiply the step length h_i)."""
    if len(h) == 1:
        return [1]
    r1 = h[0] / h[1]
    c = [(2 + r1) / 2, -r1 / 2]
    if len(h) == 2:
        return c
    a1 = (1 - h[0] / (3 * (h[0] + h[1])) * (h[0] * (h[0] + h[1])) / (h[1] * (h[1] + h[2]))) / 2
    c = [c[0] + a1, c[1] - (1 + h[1] / h[2]) * a1, a1 * h[1] / h[2]]
    if len(h) == 3:
        return c
    a2 = ((1 - h[0] / (3 * (h[0] + h[1]))) / 2 + (1 - h[0] / (2 * (h[0] + h[1]))) * h[0] / (6 * (h[0] + h[1] + h[2]))) \
         * (h[0] * (h[0] + h[1]) * (h[0] + h[1] + h[2])) / (h[1] * (h[1] + h[2]) * (h[1] + h[2] + h[3]))
    q = h[1] * (h[1] + h[2]) / (h[2] * (h[2] + h[3]))
    return [c[0] + a2, c[1] - (1 + h[1] / h[2] + q) * a2, c[2] + (h[1] / h[2] + q * (1 + h[2] / h[3])) * a2, -a2 * q * h[1] / h[2]]

def ipndm_v(net, x, sigmas, class_labels=None, order=4, afs=False, callback=None):
    """iPNDM-v: Adams-Bashforth of order up to 4 with weights for the actual, unequal steps."""
    s = sigmas.tolist()
    def weights(i, k):
        h = [s[i + 1 - j] - s[i - j] for j in range(k)]
        return [h[0] * c for c in ipndm_v_weights(h)]
    return linear_multistep(net, x, sigmas, class_labels, order, afs, callback, weights)

def deis_coefficients(sigmas, order=3, N=10000):
    """Per step i, DEIS-tAB's weights of slopes d_i, d_{i-1}, ... (empty list for Euler steps):
    the integral over the step of d sigma / dt times each slope's Lagrange polynomial in t,
    a sum over N points as diff-sampler takes it (t at linspace(t_i, t_{i+1}, N), dt = step / N).
    t is the time of diff-sampler's VP SDE for [0.002, 80] whatever the levels, the levels' t
    computed in float32 as diff-sampler does (it moves the last step's weights by 1e-3)."""
    beta_d, beta_min = diff_sampler_vp()
    t = noise_schedule('vp', beta_d, beta_min)[2](torch.as_tensor(sigmas, dtype=torch.float32).cpu()).double()
    coefficients = []
    for i in range(len(t) - 1):
        k = min(i + 1, order)
        if k == 1:
            coefficients.append([])
            continue
        taus = torch.linspace(float(t[i]), float(t[i + 1]), N, dtype=torch.float64)
        alpha = torch.exp(-0.5 * beta_d * taus ** 2 - beta_min * taus)
        dsigma_dt = 0.5 * (beta_d * taus + beta_min) / torch.sqrt(alpha * (1 - alpha))
        nodes = t[[i - j for j in range(k)]]
        row = []
        for j in range(k):
            lagrange = torch.ones_like(taus)
            for m in range(k):
                if m != j:
                    lagrange = lagrange * (taus - nodes[m]) / (nodes[j] - nodes[m])
            row.append(float(torch.sum(dsigma_dt * lagrange) * ((t[i + 1] - t[i]) / N)))
        coefficients.append(row)
    return coefficients

def deis(net, x, sigmas, class_labels=None, order=3, afs=False, callback=None):
    """DEIS-tAB: Adams-Bashforth in the VP time t with exactly integrated weights (deis_coefficients)."""
    s = sigmas.tolist()
    coefficients = deis_coefficients(s, order)
    weights = lambda i, k: coefficients[i] if k > 1 else [s[i + 1] - s[i]]
    return linear_multistep(net, x, sigmas, class_labels, order, afs, callback, weights)

#----------------------------------------------------------------------------
# Exponential integrators on the data prediction, in lambda = -log(sigma): DPM-Solver++ and UniPC.

def lower_order(i, num_steps, max_order):
    """Order of step i of num_steps levels: warm up from 1, and lower it again at the last steps
    (diff-sampler's lower_order_final), which are unstable at high order with few steps."""
    return i + 1 if i + 1 < max_order else min(max_order, num_steps - (i + 1))

def dpm_solver_pp(net, x, sigmas, class_labels=None, order=3, afs=False, callback=None):
    """Multistep DPM-Solver++ (data prediction) of order up to 3, without thresholding."""
    s = sigmas.tolist()
    history = [] # (sigma, denoised), newest first
    for i in range(len(s) - 1):
        denoised, _ = denoise(net, x, sigmas[i], class_labels, analytic=afs and i == 0)
        history = [(s[i], denoised)] + history[:2]
        k = lower_order(i, len(s), order)
        t = s[i + 1]
        (t0, m0) = history[0]
        h = np.log(t0) - np.log(t)
        phi_1 = np.expm1(-h)
        x_next = (t / t0) * x - phi_1 * m0
        if k >= 2:
            (t1, m1) = history[1]
            r0 = (np.log(t1) - np.log(t0)) / h
            D1_0 = (1 / r0) * (m0 - m1)
            if k == 2:
                x_next = x_next - 0.5 * phi_1 * D1_0
            else:
                (t2, m2) = history[2]
                r1 = (np.log(t2) - np.log(t1)) / h
                D1_1 = (1 / r1) * (m1 - m2)
                D1 = D1_0 + (r0 / (r0 + r1)) * (D1_0 - D1_1)
                D2 = (1 / (r0 + r1)) * (D1_0 - D1_1)
                phi_2 = phi_1 / h + 1
                phi_3 = phi_2 / h - 0.5
                x_next = x_next + phi_2 * D1 - phi_3 * D2
        report(callback, i, sigmas, x, denoised, x_next)
        x = x_next
    return x

def unipc_coefficients(s, t, order, variant):
    """UniPC's (rks, B_h, predictor rhos, corrector rhos) for a step from s[0] to t with the earlier
    levels s[1:order] (newest first); rks: their distances in lambda = -log(sigma), per step length."""
    h = np.log(s[0]) - np.log(t)
    hh = -h # data prediction
    rks = [(np.log(s[0]) - np.log(s_k)) / h for s_k in s[1:order]] + [1.0]
    B_h = {'bh1': hh, 'bh2': np.expm1(hh)}[variant]
    R, b = [], []
    h_phi_k, factorial = np.expm1(hh) / hh - 1, 1
    for k in range(1, order + 1):
        R.append(np.power(rks, k - 1))
        b.append(h_phi_k * factorial / B_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    R, b = np.array(R), np.array(b)
    rhos_p = [0.5] if order == 2 else np.linalg.solve(R[:-1, :-1], b[:-1]) if order > 2 else []
    rhos_c = [0.5] if order == 1 else np.linalg.solve(R, b)
    return rks, B_h, rhos_p, rhos_c

def unipc(net, x, sigmas, class_labels=None, order=3, variant='bh2', afs=False, callback=None):
    """UniPC (data prediction, B(h) of variant bh1|bh2) of order up to 3, without thresholding.
    The network's output at the predicted state x_next serves both as the corrector's input for
    this step and as the next step's history point: one evaluation per step, none at the last level."""
    s = sigmas.tolist()
    denoised, _ = denoise(net, x, sigmas[0], class_labels, analytic=afs)
    history = [(s[0], denoised)] # (sigma, denoised), newest first
    for i in range(len(s) - 1):
        k = lower_order(i, len(s), order)
        t = s[i + 1]
        rks, B_h, rhos_p, rhos_c = unipc_coefficients([sigma for sigma, _ in history], t, k, variant)
        (t0, m0) = history[0]
        D1s = [(m - m0) / rk for (_, m), rk in zip(history[1:k], rks)]
        x_base = (t / t0) * x - np.expm1(np.log(t) - np.log(t0)) * m0
        x_next = x_base - B_h * sum(rho * D for rho, D in zip(rhos_p, D1s))
        if i < len(s) - 2: # correct with the evaluation at the prediction, which the next step reuses
            model_t, _ = denoise(net, x_next, sigmas[i + 1], class_labels)
            correction = sum(rho * D for rho, D in zip(rhos_c[:-1], D1s)) + rhos_c[-1] * (model_t - m0)
            x_next = x_base - B_h * correction
            history = [(t, model_t)] + history[:order - 1]
        report(callback, i, sigmas, x, m0, x_next)
        x = x_next
    return x

#----------------------------------------------------------------------------
# Stochastic samplers of k-diffusion (sampling.py): each step adds fresh noise, eta * s_noise of it.
# noise(x) returns standard normal noise shaped like x: sample() passes the per-seed generators'
# randn_like (sampling/seeds.py), so that an image depends on its seed only, as with EDM's churn;
# without it, torch.randn_like (k-diffusion's default_noise_sampler). k-diffusion's dpmpp_2m_sde
# defaults to a BrownianTreeNoiseSampler (torchsde, not a dependency here); it, too, takes
# independent Gaussian noise per step when given default_noise_sampler, which is what runs here.
# Noise is not drawn when its scale eta * s_noise is 0 (as EDM skips churn noise at S_churn = 0),
# which keeps the per-seed noise stream of a deterministic run. The levels end at sigma_min, not 0
# (as every solver here): the last step is an ordinary step, not k-diffusion's denoising jump to 0.

def ancestral_step(sigma, sigma_next, eta=1.0):
    """(sigma_down, sigma_up): the level a deterministic step goes down to, and the noise added back
    so that the variance at sigma_next is right (DDPM's ancestral step for eta = 1)."""
    if not eta:
        return sigma_next, 0.0
    sigma_up = min(sigma_next, eta * (sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2) ** 0.5)
    return (sigma_next ** 2 - sigma_up ** 2) ** 0.5, sigma_up

def step_noise(noise, x, scale):
    """scale * standard normal noise shaped like x (0 without a draw when scale is 0)."""
    if scale == 0:
        return 0
    return scale * (torch.randn_like(x) if noise is None else noise(x))

def euler_ancestral(net, x, sigmas, class_labels=None, eta=1.0, s_noise=1.0, afs=False, noise=None, callback=None):
    """k-diffusion's euler_ancestral: an Euler step down to sigma_down, then noise of level sigma_up
    (ancestral_step); one evaluation per step. eta = 0 is Euler's method."""
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        denoised, d = denoise(net, x, sigmas[i], class_labels, analytic=afs and i == 0)
        sigma_down, sigma_up = ancestral_step(s[i], s[i + 1], eta)
        x_next = x + (sigma_down - s[i]) * d + step_noise(noise, x, s_noise * sigma_up)
        report(callback, i, sigmas, x, denoised, x_next)
        x = x_next
    return x

def dpmpp_2m_sde(net, x, sigmas, class_labels=None, eta=1.0, s_noise=1.0, solver_type='midpoint', afs=False,
                 noise=None, callback=None):
    """k-diffusion's DPM-Solver++(2M) SDE: the exponential integrator of the SDE in lambda = -log(sigma)
    on the data prediction, second order from the previous step's (solver_type midpoint|heun: how the
    difference of the two predictions enters), with noise sigma_next * sqrt(1 - exp(-2 eta h)). One
    evaluation per step. eta = 0 is k-diffusion's deterministic DPM-Solver++(2M) (midpoint)."""
    if solver_type not in ('midpoint', 'heun'):
        raise ValueError(f'unknown solver_type {solver_type!r}: choose midpoint or heun')
    s = sigmas.tolist()
    previous = None # (h, denoised) of the last step
    for i in range(len(s) - 1):
        denoised, _ = denoise(net, x, sigmas[i], class_labels, analytic=afs and i == 0)
        h = np.log(s[i]) - np.log(s[i + 1])
        eta_h = eta * h
        decay = -np.expm1(-h - eta_h) # 1 - exp(-(1 + eta) h)
        x_next = (s[i + 1] / s[i]) * np.exp(-eta_h) * x + decay * denoised
        if previous is not None:
            h_last, old_denoised = previous
            gap = (h / h_last) * (denoised - old_denoised)
            x_next = x_next + (0.5 * decay if solver_type == 'midpoint' else decay / (-h - eta_h) + 1) * gap
        x_next = x_next + step_noise(noise, x, s[i + 1] * np.sqrt(-np.expm1(-2 * eta_h)) * s_noise)
        report(callback, i, sigmas, x, denoised, x_next)
        previous = (h, denoised)
        x = x_next
    return x

#----------------------------------------------------------------------------
# Solvers by name, what they need, and sample(): generate.py's sampler interface.

# The ODE solvers (deterministic: what tools/schedule_search.py and bench/fewstep_study.py compare
# against an ODE teacher), then k-diffusion's stochastic samplers; SAMPLERS names them all.
SOLVERS = {'euler': euler, 'ipndm': ipndm, 'ipndm-v': ipndm_v, 'dpmpp': dpm_solver_pp,
           'unipc': unipc, 'deis': deis, 'dpm2': dpm_solver_2}
STOCHASTIC = {'euler_ancestral': euler_ancestral, 'dpmpp_2m_sde': dpmpp_2m_sde}
SAMPLERS = {**SOLVERS, **STOCHASTIC}
DEFAULT_ORDER = {'euler': 1, 'ipndm': 4, 'ipndm-v': 4, 'dpmpp': 3, 'unipc': 3, 'deis': 3, 'dpm2': 2,
                 'euler_ancestral': 1, 'dpmpp_2m_sde': 2}
VARIABLE_ORDER = ('ipndm', 'ipndm-v', 'dpmpp', 'unipc', 'deis') # the others have one fixed order
UNIPC_VARIANTS = ('bh1', 'bh2')

def check_noise(solver, eta=None, s_noise=None):
    """OptionError for the stochastic samplers' noise (eta, noise scale s_noise) given to a deterministic solver."""
    if solver not in STOCHASTIC and (eta is not None or s_noise not in (None, 1)):
        raise OptionError('deterministic', Opt('eta' if eta is not None else 's_noise'), ' is the stochastic samplers\' noise; ',
                          Opt('solver', solver), ' is deterministic: use ', Opt('solver', '|'.join(STOCHASTIC)))

def check_solver(solver, sigmas, order=None, afs=False, variant=None, eta=None, s_noise=None):
    """The solver's keyword arguments (order with its default; UniPC's variant; the stochastic
    samplers' eta and s_noise, default 1), or ValueError. Levels: a multistep solver of order K needs
    K steps (K + 1 levels) so that its K-th order is used; AFS needs 2 steps, so that one network
    evaluation remains."""
    if solver not in SAMPLERS:
        raise ValueError(f'unknown solver {solver!r}: choose {", ".join(SAMPLERS)}')
    check_noise(solver, eta, s_noise)
    for name, value in [('eta', eta), ('noise scale', s_noise)]:
        if value is not None and not (np.isfinite(value) and value >= 0):
            raise ValueError(f'the {name} must be a finite number >= 0, got {value}')
    max_order = DEFAULT_ORDER[solver]
    if solver not in VARIABLE_ORDER and order not in (None, max_order):
        raise ValueError(f'{solver} has the fixed order {max_order}; drop the order')
    order = max_order if order is None else order
    if not 1 <= order <= max_order:
        raise ValueError(f'{solver} has orders 1 to {max_order}, got {order}')
    if variant is not None and solver != 'unipc':
        raise ValueError(f'the variant (bh1|bh2) is UniPC\'s; drop it for {solver}')
    if solver == 'unipc' and (variant or 'bh2') not in UNIPC_VARIANTS:
        raise ValueError(f'unknown UniPC variant {variant!r}: choose bh1 or bh2')
    steps = len(sigmas) - 1
    if solver in VARIABLE_ORDER and steps < order:
        raise ValueError(f'{solver} of order {order} needs at least {order + 1} noise levels, got {len(sigmas)}: '
                         f'add levels or lower the order')
    if afs and steps < 2:
        raise ValueError(f'AFS replaces the first step\'s network evaluation and needs at least 3 noise levels, got {len(sigmas)}')
    kwargs = dict(afs=afs)
    if solver in VARIABLE_ORDER:
        kwargs['order'] = order
    if solver == 'unipc':
        kwargs['variant'] = variant or 'bh2'
    if solver in STOCHASTIC:
        kwargs.update(eta=1.0 if eta is None else float(eta), s_noise=1.0 if s_noise is None else float(s_noise))
    return kwargs

def nfe(solver, num_levels, afs=False):
    """Network evaluations per image of a solver on num_levels levels."""
    steps = num_levels - 1
    return (2 * steps if solver == 'dpm2' else steps) - int(afs)

def sample(net, latents, class_labels=None, randn_like=None, solver='ipndm', sigmas=None, order=None,
           afs=False, variant=None, eta=None, s_noise=None, guidance=None, dg_weight=2.0,
           callback: Optional[Callable[[Step], None]] = None):
    """Images at sigmas[-1] from latents [N, C, H, W] by the named solver: x = latents * sigmas[0].
    The signature of EDM's samplers, so generate_images and trace_sampler run it alike. randn_like:
    the stochastic samplers' noise, one call per step (pass the per-seed generators' randn_like, as
    generate.py does, for images that depend on their seed only); the ODE solvers do not use it.
    guidance: DG on every evaluation (GuidedDenoiser)."""
    sigmas = check_sigmas(sigmas, device=latents.device)
    kwargs = check_solver(solver, sigmas, order, afs, variant, eta, s_noise)
    if solver in STOCHASTIC:
        kwargs['noise'] = randn_like
    if guidance is not None and dg_weight != 0:
        net = GuidedDenoiser(net, guidance, dg_weight)
    return SAMPLERS[solver](net, latents.to(torch.float64) * sigmas[0], sigmas, class_labels, callback=callback, **kwargs)

#----------------------------------------------------------------------------
