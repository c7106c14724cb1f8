"""Loss functions of the paper "Elucidating the Design Space of
Diffusion-Based Generative Models" (EDM), taking AOT-paired noise.

Every loss draws one noise level sigma per image from its own distribution,
adds noise * sigma to the clean images and returns the per-element weighted
squared error of the denoiser, as EDM does. Two additions for AOT training:
`noise` is the unit N(0,1) noise to use (the pairing from training/aot.py
only permutes noise, so it stays standard normal), and `augment_labels`,
when given, says that `images` are already augmented (AOT pools are augmented
before they are paired). Class names and constructor arguments are EDM's:
EDM snapshots pickle `loss_fn`."""

import torch
from torch_utils import persistence

#----------------------------------------------------------------------------
# Shared by all losses: the (possibly augmented) clean images, their
# augment_labels, and the noise to add at the given sigma. Random draws happen
# in EDM's order (sigma before this, augmentation, then noise), so without
# noise and augment_labels the losses reproduce EDM for the same seed.

def _prepare(images, sigma, augment_pipe, noise, augment_labels):
    if augment_labels is not None:
        y = images
    elif augment_pipe is not None:
        y, augment_labels = augment_pipe(images)
    else:
        y = images
    if noise is None:
        noise = torch.randn_like(y)
    elif noise.shape != y.shape:
        raise ValueError(f'Paired noise has shape {list(noise.shape)} but the images have {list(y.shape)}; pass one noise per image')
    return y, augment_labels, noise.to(y.dtype) * sigma

#----------------------------------------------------------------------------
# Variance preserving (VP) formulation of "Score-Based Generative Modeling
# through Stochastic Differential Equations".

@persistence.persistent_class
class VPLoss:
    def __init__(self, beta_d=19.9, beta_min=0.1, epsilon_t=1e-5):
        self.beta_d = beta_d
        self.beta_min = beta_min
        self.epsilon_t = epsilon_t

    def __call__(self, net, images, labels=None, augment_pipe=None, noise=None, augment_labels=None):
        rnd_uniform = torch.rand([images.shape[0], 1, 1, 1], device=images.device)
        sigma = self.sigma(1 + rnd_uniform * (self.epsilon_t - 1))
        weight = 1 / sigma ** 2
        y, augment_labels, n = _prepare(images, sigma, augment_pipe, noise, augment_labels)
        D_yn = net(y + n, sigma, labels, augment_labels=augment_labels)
        return weight * ((D_yn - y) ** 2)

    def sigma(self, t):
        t = torch.as_tensor(t)
        return ((0.5 * self.beta_d * (t ** 2) + self.beta_min * t).exp() - 1).sqrt()

#----------------------------------------------------------------------------
# Variance exploding (VE) formulation of the same paper.

@persistence.persistent_class
class VELoss:
    def __init__(self, sigma_min=0.02, sigma_max=100):
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max

    def __call__(self, net, images, labels=None, augment_pipe=None, noise=None, augment_labels=None):
        rnd_uniform = torch.rand([images.shape[0], 1, 1, 1], device=images.device)
        sigma = self.sigma_min * ((self.sigma_max / self.sigma_min) ** rnd_uniform)
        weight = 1 / sigma ** 2
        y, augment_labels, n = _prepare(images, sigma, augment_pipe, noise, augment_labels)
        D_yn = net(y + n, sigma, labels, augment_labels=augment_labels)
        return weight * ((D_yn - y) ** 2)

#----------------------------------------------------------------------------
# EDM's loss: log-normal sigma and a weighting that makes the effective
# training target unit variance.

@persistence.persistent_class
class EDMLoss:
    def __init__(self, P_mean=-1.2, P_std=1.2, sigma_data=0.5):
        self.P_mean = P_mean
        self.P_std = P_std
        self.sigma_data = sigma_data

    def __call__(self, net, images, labels=None, augment_pipe=None, noise=None, augment_labels=None):
        rnd_normal = torch.randn([images.shape[0], 1, 1, 1], device=images.device)
        sigma = (rnd_normal * self.P_std + self.P_mean).exp()
        weight = (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2
        y, augment_labels, n = _prepare(images, sigma, augment_pipe, noise, augment_labels)
        D_yn = net(y + n, sigma, labels, augment_labels=augment_labels)
        return weight * ((D_yn - y) ** 2)

#----------------------------------------------------------------------------
