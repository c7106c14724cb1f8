"""k-diffusion's stochastic samplers in sampling/solvers.py (euler_ancestral, dpmpp_2m_sde): the same
results as a direct transcription of k-diffusion's formulas given the same noise, their eta = 0
limits, the right variance on Gaussian data, and per-seed noise (an image depends on its seed only)."""

import math

import numpy as np
import pytest
import torch

from sampling import generate as library, schedules, solvers
from sampling.seeds import StackedRandomGenerator, latents_for_seeds
from tests.helpers import GaussianDenoiser, tiny_net
from training.errors import OptionError

#----------------------------------------------------------------------------
# k-diffusion's formulas (k_diffusion/sampling.py), transcribed here on tensors as k-diffusion
# writes them: get_ancestral_step, sample_euler_ancestral, sample_dpmpp_2m_sde, sample_dpmpp_2m.
# noise() is the noise sampler, called as k-diffusion calls it.

def kd_get_ancestral_step(sigma_from, sigma_to, eta=1.0):
    if not eta:
        return sigma_to, 0.0
    sigma_up = torch.minimum(sigma_to, eta * (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2) ** 0.5)
    sigma_down = (sigma_to ** 2 - sigma_up ** 2) ** 0.5
    return sigma_down, sigma_up

def kd_euler_ancestral(model, x, sigmas, noise, eta=1.0, s_noise=1.0):
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        sigma_down, sigma_up = kd_get_ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
        d = (x - denoised) / sigmas[i]
        x = x + d * (sigma_down - sigmas[i])
        if sigmas[i + 1] > 0:
            x = x + noise(x) * s_noise * sigma_up
    return x

def kd_dpmpp_2m_sde(model, x, sigmas, noise, eta=1.0, s_noise=1.0, solver_type='midpoint'):
    old_denoised, h_last = None, None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        t, s = -sigmas[i].log(), -sigmas[i + 1].log()
        h = s - t
        eta_h = eta * h
        x = sigmas[i + 1] / sigmas[i] * (-eta_h).exp() * x + (-h - eta_h).expm1().neg() * denoised
        if old_denoised is not None:
            r = h_last / h
            if solver_type == 'heun':
                x = x + ((-h - eta_h).expm1().neg() / (-h - eta_h) + 1) * (1 / r) * (denoised - old_denoised)
            else:
                x = x + 0.5 * (-h - eta_h).expm1().neg() * (1 / r) * (denoised - old_denoised)
        if eta:
            x = x + noise(x) * sigmas[i + 1] * (-2 * eta_h).expm1().neg().sqrt() * s_noise
        old_denoised, h_last = denoised, h
    return x

def kd_dpmpp_2m(model, x, sigmas):
    old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        t, t_next = -sigmas[i].log(), -sigmas[i + 1].log()
        h = t_next - t
        if old_denoised is None:
            x = (sigmas[i + 1] / sigmas[i]) * x - (-h).expm1() * denoised
        else:
            r = (t - (-sigmas[i - 1].log())) / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigmas[i + 1] / sigmas[i]) * x - (-h).expm1() * denoised_d
        old_denoised = denoised
    return x

def seeded_noise(seed):
    """A noise sampler: standard normal draws from one generator, in call order."""
    gen = torch.Generator().manual_seed(seed)
    return lambda x: torch.randn(x.shape, dtype=x.dtype, generator=gen)

def no_noise(x):
    raise AssertionError('noise drawn where its scale is 0')

LATENTS = torch.randn([3, 2, 4, 4], dtype=torch.float64, generator=torch.Generator().manual_seed(5))

#----------------------------------------------------------------------------
# Against k-diffusion's formulas, with the same noise fed in.

@pytest.mark.parametrize('levels', ['edm', 'logsnr'])
@pytest.mark.parametrize('eta, s_noise', [(1.0, 1.0), (0.5, 0.8), (1.7, 1.0)])
def test_euler_ancestral_matches_k_diffusion(levels, eta, s_noise):
    net, sigmas = GaussianDenoiser(), schedules.get_sigmas(levels, 7)
    ours = solvers.sample(net, LATENTS, solver='euler_ancestral', sigmas=sigmas, eta=eta, s_noise=s_noise, randn_like=seeded_noise(1))
    reference = kd_euler_ancestral(net, LATENTS * sigmas[0], sigmas, seeded_noise(1), eta=eta, s_noise=s_noise)
    torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-12)
    # The noise matters: other noise gives another result.
    other = solvers.sample(net, LATENTS, solver='euler_ancestral', sigmas=sigmas, eta=eta, s_noise=s_noise, randn_like=seeded_noise(2))
    assert (other - ours).abs().max() > 1e-3

@pytest.mark.parametrize('solver_type', ['midpoint', 'heun'])
@pytest.mark.parametrize('eta, s_noise', [(1.0, 1.0), (0.5, 0.8), (0.0, 1.0)])
def test_dpmpp_2m_sde_matches_k_diffusion(solver_type, eta, s_noise):
    net, sigmas = GaussianDenoiser(), schedules.get_sigmas('logsnr', 7)
    x = LATENTS * sigmas[0]
    ours = solvers.dpmpp_2m_sde(net, x, sigmas, eta=eta, s_noise=s_noise, solver_type=solver_type,
                                noise=no_noise if eta == 0 else seeded_noise(1))
    reference = kd_dpmpp_2m_sde(net, x, sigmas, seeded_noise(1), eta=eta, s_noise=s_noise, solver_type=solver_type)
    torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-12)

def test_dpmpp_2m_sde_default_is_midpoint():
    net, sigmas = GaussianDenoiser(), schedules.edm_sigmas(6)
    ours = solvers.sample(net, LATENTS, solver='dpmpp_2m_sde', sigmas=sigmas, randn_like=seeded_noise(3))
    reference = kd_dpmpp_2m_sde(net, LATENTS * sigmas[0], sigmas, seeded_noise(3))
    torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-12)
    heun = kd_dpmpp_2m_sde(net, LATENTS * sigmas[0], sigmas, seeded_noise(3), solver_type='heun')
    assert (heun - ours).abs().max() > 1e-4

#----------------------------------------------------------------------------
# eta = 0: the deterministic solvers, and no noise drawn.

def test_euler_ancestral_at_eta_0_is_euler():
    net, sigmas = GaussianDenoiser(), schedules.edm_sigmas(8)
    ours = solvers.sample(net, LATENTS, solver='euler_ancestral', sigmas=sigmas, eta=0, randn_like=no_noise)
    torch.testing.assert_close(ours, solvers.sample(net, LATENTS, solver='euler', sigmas=sigmas), rtol=1e-12, atol=1e-12)

def test_dpmpp_2m_sde_at_eta_0_is_dpmpp_2m():
    """k-diffusion's DPM-Solver++(2M); the same steps as dpmpp of order 2 but the last, where
    diff-sampler's dpmpp lowers the order to 1 (lower_order_final) and k-diffusion's does not."""
    net, sigmas = GaussianDenoiser(), schedules.logsnr_sigmas(8)
    steps, dpmpp = [], []
    ours = solvers.sample(net, LATENTS, solver='dpmpp_2m_sde', sigmas=sigmas, eta=0, randn_like=no_noise, callback=steps.append)
    torch.testing.assert_close(ours, kd_dpmpp_2m(net, LATENTS * sigmas[0], sigmas), rtol=1e-12, atol=1e-12)
    solvers.sample(net, LATENTS, solver='dpmpp', order=2, sigmas=sigmas, callback=dpmpp.append)
    for a, b in zip(steps[:-1], dpmpp[:-1]):
        torch.testing.assert_close(a.x_next, b.x_next, rtol=1e-12, atol=1e-12)
    assert (steps[-1].x_next - dpmpp[-1].x_next).abs().max() > 1e-8

def test_no_noise_drawn_at_noise_scale_0():
    net, sigmas = GaussianDenoiser(), schedules.edm_sigmas(5)
    for solver in solvers.STOCHASTIC:
        solvers.sample(net, LATENTS, solver=solver, sigmas=sigmas, s_noise=0, randn_like=no_noise)

#----------------------------------------------------------------------------
# Gaussian data: with many steps the samples have the data's variance.

@pytest.mark.parametrize('solver, levels, tolerance', [('euler_ancestral', 401, 0.03), ('dpmpp_2m_sde', 201, 0.01)])
def test_samples_of_gaussian_data_have_its_variance(solver, levels, tolerance):
    """Data N(0, 0.5^2): at sigma_min = 0.002 the samples' std is sqrt(0.5^2 + 0.002^2), whatever the
    latents' own spread (each step's fresh noise replaces part of the start's). 8,000 values: the
    estimate's own error is about 0.4%. With few steps euler_ancestral is far off (0.31 at 11 levels)."""
    net = GaussianDenoiser()
    rnd = StackedRandomGenerator('cpu', range(500))
    x = solvers.sample(net, rnd.randn([500, 1, 4, 4], dtype=torch.float64), solver=solver, sigmas=schedules.edm_sigmas(levels),
                       randn_like=rnd.randn_like)
    assert abs(x.std().item() / math.hypot(0.5, 0.002) - 1) < tolerance
    assert abs(x.mean().item()) < 0.02

#----------------------------------------------------------------------------
# Seeds: image i of seed s is the same at any batch size and in any company.

class GaussianNet(GaussianDenoiser):
    img_channels, img_resolution, label_dim = 3, 4, 0

@pytest.mark.parametrize('solver', list(solvers.STOCHASTIC))
def test_per_seed_noise(solver):
    net, sigmas = GaussianNet(), schedules.edm_sigmas(6)
    def run(seeds):
        latents, _, rnd = latents_for_seeds(net, seeds)
        return solvers.sample(net, latents, solver=solver, sigmas=sigmas, randn_like=rnd.randn_like)
    together = run([4, 7, 9, 11])
    alone = torch.cat([run([s]) for s in [4, 7, 9, 11]])
    shuffled = run([11, 3, 9, 4, 7])[[3, 4, 2, 0]]
    assert torch.equal(together, alone) and torch.equal(together, shuffled)
    latents, _, _ = latents_for_seeds(net, [4, 7, 9, 11])
    ode = solvers.sample(net, latents, solver=solver, sigmas=sigmas, eta=0)
    assert (ode - together).abs().max() > 1e-2 # the per-seed noise is there

def test_generate_images_batches_agree():
    """generate_images (generate.py's loop, make_sampler's options) on a real network: the same uint8
    images for batches of 4 and of 1 and 3."""
    net = tiny_net()
    for solver in solvers.STOCHASTIC:
        sampler = library.make_sampler(net, dict(solver=solver, num_steps=5, rho=7, eta=0.8, S_noise=1.0))
        assert sampler.kwargs['eta'] == 0.8 and sampler.kwargs['s_noise'] == 1.0 and sampler.nfe == 4
        assert ', 5 levels, eta 0.8, noise scale 1, 4 NFE' in library.describe(sampler)
        batches = lambda sampler, groups: np.concatenate([images for _, images, _ in library.generate_images(net, sampler.fn, sampler.kwargs, groups)])
        four, split = batches(sampler, [[0, 1, 2, 3]]), batches(sampler, [[0], [1, 2, 3]])
        assert np.array_equal(four, split)
        ode = library.make_sampler(net, dict(solver=solver, num_steps=5, rho=7, eta=0))
        assert (batches(ode, [[0, 1, 2, 3]]) != four).mean() > 0.05 # the noise reaches the images

#----------------------------------------------------------------------------
# Options.

@pytest.mark.parametrize('kwargs, message', [
    (dict(solver='ipndm', eta=1.0), 'deterministic'),
    (dict(solver='dpmpp', s_noise=0.5), 'deterministic'),
    (dict(solver='euler_ancestral', eta=-1.0), 'eta'),
    (dict(solver='dpmpp_2m_sde', s_noise=float('nan')), 'noise scale'),
    (dict(solver='dpmpp_2m_sde', order=1), 'fixed order 2'),
])
def test_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        solvers.sample(GaussianDenoiser(), torch.zeros([1, 3, 4, 4]), sigmas=schedules.edm_sigmas(6), **kwargs)
    with pytest.raises(ValueError, match='solver_type'):
        solvers.dpmpp_2m_sde(GaussianDenoiser(), torch.zeros([1, 1, 1, 1]), schedules.edm_sigmas(3), solver_type='euler')

def test_noise_of_a_deterministic_solver_names_the_option():
    # By key, as the options dict has it: generate.py names the flags (--eta, --S_noise, --solver).
    for kwargs, option in [(dict(eta=0.0), 'eta'), (dict(s_noise=0.5), 's_noise'), (dict(eta=1.0, s_noise=0.5), 'eta')]:
        with pytest.raises(OptionError) as info:
            solvers.check_noise('dpmpp', **kwargs)
        assert str(info.value) == f"{option} is the stochastic samplers' noise; solver=dpmpp is deterministic: use solver=euler_ancestral|dpmpp_2m_sde"
    solvers.check_noise('dpmpp', s_noise=1) # the default noise scale, given or not
    solvers.check_noise('euler_ancestral', eta=0.5, s_noise=0.5)

@pytest.mark.parametrize('solver', list(solvers.STOCHASTIC))
def test_nfe_and_afs(solver):
    from sampling.denoisers import NFECounter
    sigmas = schedules.edm_sigmas(6)
    for afs in (False, True):
        counter = NFECounter(GaussianDenoiser())
        solvers.sample(counter, LATENTS, solver=solver, sigmas=sigmas, afs=afs, randn_like=seeded_noise(0))
        assert counter.nfe == solvers.nfe(solver, len(sigmas), afs) == 5 - afs
        assert (float(sigmas[0]) in counter.sigmas) != afs
