"""Discriminator Guidance: DG's architecture, weights layout and math against DG's own outputs
(tests/golden/dg), the guided sampler, and the discriminator file format."""

import json
import os

import numpy as np
import pytest
import torch

from training import guidance, sampling
from training.guidance import (DiscriminatorGuidance, Discriminator, adm_classifier, discriminator_head,
                               vp_time, vp_mean_std)

GOLDEN = os.path.join(os.path.dirname(__file__), 'golden', 'dg')

def fill_params(module, seed):
    """README.json's fill_params: deterministic weights for DG's modules."""
    state = {}
    for k, (name, t) in enumerate(module.state_dict().items()):
        r = torch.randn(t.shape, generator=torch.Generator().manual_seed(seed * 100003 + k))
        state[name] = r / np.sqrt(t.numel() / t.shape[0]) if t.ndim >= 2 else (1 + 0.1 * r if name.endswith('weight') else 0.1 * r)
    module.load_state_dict(state, strict=True)
    return module.eval().requires_grad_(False)

@pytest.fixture(scope='module')
def dg_modules():
    return dict(classifier=fill_params(adm_classifier(32), 1), uncond=fill_params(discriminator_head(), 2),
                cond=fill_params(discriminator_head(cond=True), 3))

#----------------------------------------------------------------------------

def test_state_dict_keys_and_shapes_match_dg_checkpoints():
    expected = json.load(open(os.path.join(GOLDEN, 'state_dict_keys.json')))
    for name, module in [('classifier', adm_classifier(32)), ('discriminator_uncond', discriminator_head()),
                         ('discriminator_cond', discriminator_head(cond=True))]:
        got = [[k, list(v.shape)] for k, v in module.state_dict().items()]
        assert got == expected[name], name
        # What DG's published .pt files hold loads with strict=True.
        module.load_state_dict({k: torch.zeros(s) for k, s in expected[name]}, strict=True)

def test_features_and_heads_match_dg(dg_modules):
    ref = np.load(os.path.join(GOLDEN, 'nets.npz'))
    x, t, labels = (torch.from_numpy(ref[k]) for k in ('x', 't', 'labels'))
    with torch.no_grad():
        features = dg_modules['classifier'](x, t, feature=True)
        assert features.shape == (3, 512, 8, 8)
        np.testing.assert_allclose(features.numpy(), ref['features'], rtol=0, atol=1e-5)
        np.testing.assert_allclose(dg_modules['classifier'](x, t).numpy(), ref['classifier_logits'], rtol=0, atol=1e-5)
        feats = torch.from_numpy(ref['features'])
        np.testing.assert_allclose(dg_modules['uncond'](feats, t, sigmoid=True).view(-1).numpy(), ref['disc_uncond'], rtol=0, atol=1e-6)
        np.testing.assert_allclose(dg_modules['cond'](feats, t, sigmoid=True, condition=labels).view(-1).numpy(), ref['disc_cond'], rtol=0, atol=1e-6)
        # Class indices work as well as one-hot labels; a conditional head needs them.
        np.testing.assert_allclose(dg_modules['cond'](feats, t, sigmoid=True, condition=labels.argmax(1)).view(-1).numpy(), ref['disc_cond'], rtol=0, atol=1e-6)
        with pytest.raises(ValueError, match='condition'):
            dg_modules['cond'](feats, t)

def test_vp_conversion_matches_dg():
    ref = np.load(os.path.join(GOLDEN, 'correction.npz'))
    t = vp_time(torch.from_numpy(ref['sigma']))
    np.testing.assert_allclose(t.numpy(), ref['tau'], rtol=1e-12)
    np.testing.assert_allclose(vp_mean_std(t)[0].numpy(), ref['mean_vp'], rtol=1e-12)
    # The VP perturbation at t has the same signal-to-noise ratio as EDM's sigma.
    mean, std = vp_mean_std(t)
    np.testing.assert_allclose((std / mean).numpy(), ref['sigma'], rtol=1e-9)

def test_correction_matches_dg(dg_modules):
    ref = np.load(os.path.join(GOLDEN, 'correction.npz'))
    x, sigma, labels = (torch.from_numpy(ref[k]) for k in ('x', 'sigma', 'labels'))
    for name in ['uncond', 'cond']:
        dg = DiscriminatorGuidance(dg_modules['classifier'], dg_modules[name], time_min=0.01, time_max=1.0)
        grad, log_ratio = dg.correction(x, sigma, labels)
        scale = np.abs(ref[f'grad_{name}']).max()
        np.testing.assert_allclose(grad.numpy(), ref[f'grad_{name}'], rtol=0, atol=1e-5 * scale)
        np.testing.assert_allclose(log_ratio.numpy(), ref[f'log_ratio_{name}'], rtol=0, atol=1e-5)

    # Window [0.2, 1]: DG decides by the batch's smallest time (0.0116 here): no correction at all.
    dg = DiscriminatorGuidance(dg_modules['classifier'], dg_modules['uncond'], time_min=0.2, window='batch')
    grad, log_ratio = dg.correction(x, sigma, labels)
    np.testing.assert_array_equal(grad.numpy(), ref['grad_uncond_window_0.2'])
    assert torch.isinf(log_ratio).all()
    # Per sample (the default): the samples inside the window get DG's correction, the other none.
    dg = DiscriminatorGuidance(dg_modules['classifier'], dg_modules['uncond'], time_min=0.2)
    grad, log_ratio = dg.correction(x, sigma, labels)
    assert not grad[0].any() and torch.isinf(log_ratio[0])
    np.testing.assert_allclose(grad[1:].numpy(), ref['grad_uncond'][1:], rtol=0, atol=1e-5 * np.abs(ref['grad_uncond']).max())
    np.testing.assert_allclose(log_ratio[1:].numpy(), ref['log_ratio_uncond'][1:], rtol=0, atol=1e-5)

#----------------------------------------------------------------------------
# The guided sampler.

def golden_edm_net():
    from training import networks
    meta = json.load(open(os.path.join(GOLDEN, 'sampler.json')))
    net = networks.EDMPrecond(**meta['edm_net_kwargs'])
    net.load_state_dict(torch.load(os.path.join(GOLDEN, 'edm_net_32.pt'), weights_only=True), strict=True)
    return net.eval().requires_grad_(False), meta

# w2_first_only is left out to keep the suite fast (~30 s per guided case on one core): w2_boosting
# runs the same weight-2 correction and, on top of it, boosting's doubling of fake samples.
@pytest.mark.parametrize('case', ['w0_plain', 'w1_cond', 'w2_boosting'])
def test_sampler_matches_dg(case, dg_modules):
    net, meta = golden_edm_net()
    cfg = meta['cases'][case]
    ref = np.load(os.path.join(GOLDEN, 'sampler.npz'))
    latents, labels = torch.from_numpy(ref['latents']), torch.from_numpy(ref['class_labels'])
    gen = torch.Generator().manual_seed(0)
    randn_like = lambda x: torch.randn(x.shape, dtype=torch.float64, generator=gen)
    dg = DiscriminatorGuidance(dg_modules['classifier'], dg_modules['cond' if cfg['cond'] else 'uncond'], meta['time_min'], meta['time_max'])
    kwargs = dict(num_steps=meta['num_steps'], rho=meta['rho'])
    with torch.no_grad():
        images = sampling.edm_sampler(net, latents, labels, randn_like=randn_like, guidance=dg, dg_weight=cfg['dg_weight_1st_order'],
                                      dg_weight_2nd=cfg['dg_weight_2nd_order'], dg_boosting=bool(cfg['boosting']), **kwargs)
        assert images.dtype == torch.float64
        # DG keeps its sigmas in float32 where this sampler keeps float64: differences of ~1e-5.
        np.testing.assert_allclose(images.numpy(), ref[case], rtol=0, atol=5e-5)
        if case == 'w0_plain': # weight 0 is EDM's sampler, and so is guidance=None
            assert torch.equal(images, sampling.edm_sampler(net, latents, labels, **kwargs))
    assert np.abs(ref[case] - ref['w0_plain']).max() > 0.1 or case == 'w0_plain' # the cases tell guidance apart

class GaussianDenoiser:
    """Ideal denoiser of N(0, 0.25 I) data, for per-sample noise levels too."""
    sigma_min, sigma_max, round_sigma = 0, float('inf'), staticmethod(torch.as_tensor)
    def __call__(self, x, sigma, class_labels=None):
        return x * 0.25 / (0.25 + sampling.per_sample(torch.as_tensor(sigma, dtype=torch.float64)) ** 2)

class LinearGuidance:
    """A stand-in with a closed-form correction: c * x, log ratio = -1 (all 'fake')."""
    def __init__(self, c):
        self.c, self.calls = c, []
    def correction(self, x, sigma, class_labels=None):
        self.calls.append(torch.as_tensor(sigma).clone())
        return (self.c * x).float(), torch.full([x.shape[0]], -1.0)

def test_second_order_correction_is_heun_with_corrected_slopes():
    net, latents = GaussianDenoiser(), torch.randn([3, 1, 4, 4], generator=torch.Generator().manual_seed(0))
    w1, w2, c = 1.5, 0.7, 0.3
    guide = LinearGuidance(c)
    out = sampling.edm_sampler(net, latents, num_steps=4, guidance=guide, dg_weight=w1, dg_weight_2nd=w2)
    # DG's reference passes a 0-dim t_next at the second evaluation and crashes; here it works.
    assert [s.ndim for s in guide.calls] == [0] * 7
    # Direct computation: Heun steps with the slope d = (x - D) / t + w * c * x / t.
    t = sampling.edm_time_steps(4)
    x = latents.double() * t[0]
    slope = lambda x, s, w: (x - net(x, s)) / s + w * ((c * x).float() / s)
    for i in range(4):
        d = slope(x, t[i], w1)
        x_euler = x + (t[i + 1] - t[i]) * d
        x = x_euler if i == 3 else x + (t[i + 1] - t[i]) * 0.5 * (d + slope(x_euler, t[i + 1], w2))
    assert (out - x).abs().max() <= 1e-12 * x.abs().max()
    # The second-order weight matters; without it only the Euler evaluations are corrected.
    only_first = sampling.edm_sampler(net, latents, num_steps=4, guidance=LinearGuidance(c), dg_weight=w1)
    assert (only_first - out).abs().max() > 1e-3

def test_boosting_raises_churn_of_fake_samples_only():
    class HalfFake(LinearGuidance):
        def correction(self, x, sigma, class_labels=None):
            grad, _ = super().correction(x, sigma)
            return grad, torch.tensor([-1.0, 1.0]) # sample 0 fake, sample 1 real
    net, latents = GaussianDenoiser(), torch.randn([2, 1, 4, 4], generator=torch.Generator().manual_seed(1))
    steps, draws = [], []
    def randn_like(x):
        draws.append(x.shape)
        return torch.ones_like(x)
    sampling.edm_sampler(net, latents, num_steps=11, randn_like=randn_like, guidance=HalfFake(0.0), dg_weight=1.0,
                         dg_boosting=True, callback=steps.append)
    assert len(draws) == 11 # one draw per step, as DG, so the noise stream does not depend on the decisions
    for s in steps:
        if s.i in (5, 10): # every 5th step after the first guided one: churn 4 for the fake sample only
            gamma = min(4 / 11, np.sqrt(2) - 1)
            assert torch.allclose(s.t_hat, torch.tensor([s.t_cur * (1 + gamma), s.t_cur], dtype=torch.float64))
        else:
            assert torch.as_tensor(s.t_hat).ndim == 0 and s.t_hat == s.t_cur and torch.equal(s.x_hat, s.x_cur)
