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
