"""VPLoss, VELoss, EDMLoss (training/loss.py) with paired noise and external augment labels."""

import math
import pickle

import pytest
import torch

from training.loss import VPLoss, VELoss, EDMLoss
from training.augment import AugmentPipe

LOSSES = [VPLoss, VELoss, EDMLoss]

class RecordingNet:
    """Stand-in denoiser: returns scale * x and records what the loss passed in."""
    def __init__(self, scale=0.5):
        self.scale = scale
    def __call__(self, x, sigma, class_labels=None, augment_labels=None):
        self.x, self.sigma, self.class_labels, self.augment_labels = x, sigma, class_labels, augment_labels
        return x * self.scale

def batch(n=8, c=3, res=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand([n, c, res, res], generator=gen) * 2 - 1, torch.randn([n, c, res, res], generator=gen)

def expected_weight(loss_fn, sigma):
    if isinstance(loss_fn, EDMLoss):
        return (sigma ** 2 + loss_fn.sigma_data ** 2) / (sigma * loss_fn.sigma_data) ** 2
    return 1 / sigma ** 2

#----------------------------------------------------------------------------

@pytest.mark.parametrize('cls', LOSSES)
def test_supplied_noise_is_used_and_scaled_by_sigma(cls):
    images, noise = batch()
    net, loss_fn = RecordingNet(), cls()
    torch.manual_seed(0)
    loss = loss_fn(net, images, noise=noise)
    assert loss.shape == images.shape and torch.isfinite(loss).all()
    sigma = net.sigma
    assert sigma.shape == (8, 1, 1, 1)
    torch.testing.assert_close(net.x, images + noise * sigma, rtol=0, atol=0)
    # Weighting formula against a direct computation.
    torch.testing.assert_close(loss, expected_weight(loss_fn, sigma) * (net.x * 0.5 - images) ** 2)
    # The same sigma RNG state with other noise changes only the noise term.
    torch.manual_seed(0)
    loss_fn(net, images, noise=-noise)
    torch.testing.assert_close(net.sigma, sigma, rtol=0, atol=0)
    torch.testing.assert_close(net.x, images - noise * sigma, rtol=0, atol=0)

@pytest.mark.parametrize('cls', LOSSES)
def test_without_noise_draws_randn_after_sigma(cls):
    # EDM's order of random draws: sigma, then the noise.
    images, _ = batch()
    net, loss_fn = RecordingNet(), cls()
    torch.manual_seed(1)
    loss_fn(net, images)
    torch.manual_seed(1)
    (torch.randn if cls is EDMLoss else torch.rand)([8, 1, 1, 1]) # the sigma draw
    noise = torch.randn_like(images)
    torch.testing.assert_close(net.x, images + noise * net.sigma)

def test_sigma_distributions():
    images = torch.zeros([20000, 1, 1, 1])
    net = RecordingNet()
    torch.manual_seed(2)

    EDMLoss()(net, images)
    log_sigma = net.sigma.flatten().log()
    assert abs(log_sigma.mean().item() - (-1.2)) < 0.05 and abs(log_sigma.std().item() - 1.2) < 0.05

    VELoss()(net, images)
    u = (net.sigma.flatten() / 0.02).log() / math.log(100 / 0.02) # uniform in [0, 1)
    assert u.min() >= 0 and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.01 and abs(u.var().item() - 1 / 12) < 0.005

    vp = VPLoss()
    vp(net, images)
    sigma = net.sigma.flatten().double()
    # Invert sigma(t) = sqrt(exp(0.5 beta_d t^2 + beta_min t) - 1): t is uniform in [epsilon_t, 1].
    t = (-vp.beta_min + (vp.beta_min ** 2 + 2 * vp.beta_d * (1 + sigma ** 2).log()).sqrt()) / vp.beta_d
    assert t.min() >= 1e-5 - 1e-9 and t.max() <= 1 + 1e-6 and abs(t.mean().item() - 0.5) < 0.01
    torch.testing.assert_close(vp.sigma(t), sigma, rtol=1e-6, atol=0)

@pytest.mark.parametrize('cls', LOSSES)
def test_augment_labels_passthrough_skips_the_pipe(cls):
    images, noise = batch()
    labels = torch.eye(10)[:8]
    augment_labels = torch.randn([8, 9])
    class FailingPipe:
        def __call__(self, images):
            raise AssertionError('images that come with augment_labels must not be augmented again')
    net = RecordingNet()
    cls()(net, images, labels, augment_pipe=FailingPipe(), noise=noise, augment_labels=augment_labels)
    assert net.augment_labels is augment_labels and net.class_labels is labels
    torch.testing.assert_close(net.x, images + noise * net.sigma, rtol=0, atol=0)

@pytest.mark.parametrize('cls', LOSSES)
def test_augment_pipe_is_applied_when_no_labels_given(cls):
    images, noise = batch(n=16)
    net = RecordingNet(scale=0.0)
    torch.manual_seed(3)
    loss = cls()(net, images, augment_pipe=AugmentPipe(xflip=1), noise=noise)
    assert net.augment_labels.shape == (16, 1)
    flipped = net.augment_labels[:, 0] == 1
    assert flipped.any() and (~flipped).any()
    target = torch.where(flipped.reshape(-1, 1, 1, 1), images.flip(3), images)
    # With a zero denoiser the loss is weight * target^2, so the target is the augmented image.
    torch.testing.assert_close(loss, expected_weight(cls(), net.sigma) * target ** 2)

@pytest.mark.parametrize('cls', LOSSES)
def test_no_augmentation_passes_none(cls):
    # The EDM-AOT reference crashed here (--augment 0): augment_labels None must reach the net as None.
    images, noise = batch()
    net = RecordingNet()
    loss = cls()(net, images, noise=noise)
    assert net.augment_labels is None and net.class_labels is None and torch.isfinite(loss).all()

def test_noise_shape_mismatch_is_a_clear_error():
    images, noise = batch()
    with pytest.raises(ValueError, match='one noise per image'):
        EDMLoss()(RecordingNet(), images, noise=noise[:4])

@pytest.mark.parametrize('cls,kwargs', [(VPLoss, dict(beta_d=19.9, beta_min=0.1, epsilon_t=1e-5)),
    (VELoss, dict(sigma_min=0.02, sigma_max=100)), (EDMLoss, dict(P_mean=-1.2, P_std=1.2, sigma_data=0.5))])
def test_edm_constructor_defaults_and_pickle(cls, kwargs):
    loss_fn = cls()
    assert {k: getattr(loss_fn, k) for k in kwargs} == kwargs
    clone = pickle.loads(pickle.dumps(cls(**kwargs)))
    assert type(clone).__name__ == cls.__name__ and clone.init_kwargs == kwargs

def test_with_edm_networks_if_available():
    networks = pytest.importorskip('training.networks', reason='training.networks not available yet')
    net = networks.EDMPrecond(img_resolution=8, img_channels=3, label_dim=0, model_type='SongUNet',
        model_channels=16, channel_mult=[1], num_blocks=1, attn_resolutions=[], augment_dim=9)
    images, noise = batch(n=2, res=8)
    for augment_labels in [None, torch.zeros([2, 9])]:
        loss = EDMLoss()(net, images, noise=noise, augment_labels=augment_labels)
        assert loss.shape == images.shape and torch.isfinite(loss).all()

#----------------------------------------------------------------------------
