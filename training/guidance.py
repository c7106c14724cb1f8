"""The discriminator of Discriminator Guidance (DG; Kim et al., "Refining Generative Process with Discriminator Guidance
in Score-based Diffusion Models", ICML 2023) and DG trained on AOT-paired noise (DG-AOT).

A discriminator d(x_t, t) = P(real | x_t) on VP-perturbed images corrects the sampler's score by
grad log(d / (1 - d)). It is a frozen feature extractor (DG: the 32x32 ADM noise-conditional
classifier, guided-diffusion's EncoderUNetModel) followed by a small trainable head of the same
family. Module and parameter names follow guided-diffusion, so DG's published checkpoints
(32x32_classifier.pt, discriminator_60.pt, discriminator_250.pt) load with strict=True.

Times: the discriminator works in the VP SDE of DG (beta_0 = 0.1, beta_1 = 20, time t in [0, 1]);
the EDM sampler's noise level sigma maps to t = vp_time(sigma), and its unscaled state x to the
VP state vp_mean(t) * x.

This module is the discriminator network (its files and pickles name training.guidance), trained by
train_discriminator.py; the correction it gives a sampler, and DG's sampler, are sampling/guidance.py.
"""

import math

import numpy as np
import torch
from torch.nn import functional as F

from torch_utils import persistence

VP_BETA_0, VP_BETA_1 = 0.1, 20.0   # DG's VP SDE
ADM_NUM_CLASSES = 1000             # label table of DG's conditional head (CIFAR-10 uses 10 entries)
LOG_RATIO_OUTSIDE_WINDOW = float('inf') # log ratio reported where no correction is applied

#----------------------------------------------------------------------------
# Building blocks of guided-diffusion's encoder, with its parameter names.

def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding [N, dim] of (fractional) timesteps [N]: cosines, then sines."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

class GroupNorm32(torch.nn.GroupNorm):
    """32-group normalization, computed in float32."""
    def __init__(self, channels):
        super().__init__(32, channels)

    def forward(self, x):
        return super().forward(x.float()).type(x.dtype)

def qkv_attention(q, k, v):
    """Softmax attention over T positions of [B, C, T] queries, keys and values."""
    scale = 1 / math.sqrt(math.sqrt(q.shape[1]))
    weight = torch.einsum('bct,bcs->bts', q * scale, k * scale)
    weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
    return torch.einsum('bts,bcs->bct', weight, v)

class ResBlock(torch.nn.Module):
    """Residual block with scale-shift conditioning on the time embedding; down=True halves the size."""
    def __init__(self, channels, emb_channels, out_channels=None, dropout=0, down=False):
        super().__init__()
        out_channels = out_channels or channels
        self.down = down
        self.in_layers = torch.nn.Sequential(GroupNorm32(channels), torch.nn.SiLU(), torch.nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = torch.nn.Sequential(torch.nn.SiLU(), torch.nn.Linear(emb_channels, 2 * out_channels))
        self.out_layers = torch.nn.Sequential(GroupNorm32(out_channels), torch.nn.SiLU(), torch.nn.Dropout(p=dropout),
                                              torch.nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = torch.nn.Identity() if out_channels == channels else torch.nn.Conv2d(channels, out_channels, 1)

    def forward(self, x, emb):
        h = self.in_layers[:-1](x)
        if self.down:
            h, x = F.avg_pool2d(h, 2), F.avg_pool2d(x, 2)
        h = self.in_layers[-1](h)
        scale, shift = self.emb_layers(emb).type(h.dtype)[..., None, None].chunk(2, dim=1)
        h = self.out_layers[0](h) * (1 + scale) + shift
        return self.skip_connection(x) + self.out_layers[1:](h)

class AttentionBlock(torch.nn.Module):
    """Self-attention over positions; heads split before q, k, v (guided-diffusion's legacy order)."""
    def __init__(self, channels, num_head_channels=64):
        super().__init__()
        if channels % num_head_channels:
            raise ValueError(f'{channels} channels do not split into heads of {num_head_channels}')
        self.num_heads = channels // num_head_channels
        self.norm = GroupNorm32(channels)
        self.qkv = torch.nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = torch.nn.Conv1d(channels, channels, 1)

    def forward(self, x):
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(x))
        q, k, v = qkv.reshape(b * self.num_heads, 3 * c // self.num_heads, -1).chunk(3, dim=1)
        h = self.proj_out(qkv_attention(q, k, v).reshape(b, c, -1))
        return (x + h).reshape(b, c, *spatial)

class AttentionPool2d(torch.nn.Module):
    """CLIP's attention pooling: the mean position attends to all; heads split after q, k, v."""
    def __init__(self, spatial_dim, channels, num_head_channels, out_channels):
        super().__init__()
        self.num_heads = channels // num_head_channels
        self.positional_embedding = torch.nn.Parameter(torch.randn(channels, spatial_dim ** 2 + 1) / channels ** 0.5)
        self.qkv_proj = torch.nn.Conv1d(channels, 3 * channels, 1)
        self.c_proj = torch.nn.Conv1d(channels, out_channels, 1)

    def forward(self, x):
        b, c = x.shape[:2]
        x = x.reshape(b, c, -1)
        x = torch.cat([x.mean(dim=-1, keepdim=True), x], dim=-1) + self.positional_embedding[None].to(x.dtype)
        q, k, v = (t.reshape(b * self.num_heads, c // self.num_heads, -1) for t in self.qkv_proj(x).chunk(3, dim=1))
        return self.c_proj(qkv_attention(q, k, v).reshape(b, c, -1))[:, :, 0]

class TimestepSequential(torch.nn.Sequential):
    """Sequential that hands the time embedding to the residual blocks."""
    def forward(self, x, emb):
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x

#----------------------------------------------------------------------------
# guided-diffusion's EncoderUNetModel (pool='attention', scale-shift norm, resblock down-sampling)
# with DG's additions: feature=True returns the activations before the output pool, sigmoid=True
# the probability, and condition= adds a class embedding (conditional heads). out_channels=0 builds
# a feature extractor without the output pool: under DDP every trainable parameter must be used.

class EncoderUNet(torch.nn.Module):
    def __init__(self, img_resolution, in_channels, model_channels, out_channels, num_res_blocks,
                 attention_ds, channel_mult, num_head_channels=64, num_classes=0, dropout=0):
        super().__init__()
        self.img_resolution, self.in_channels, self.out_channels = img_resolution, in_channels, out_channels
        self.model_channels, self.num_classes = model_channels, num_classes
        emb_channels = 4 * model_channels
        self.time_embed = torch.nn.Sequential(torch.nn.Linear(model_channels, emb_channels), torch.nn.SiLU(),
                                              torch.nn.Linear(emb_channels, emb_channels))
        if num_classes:
            self.label_emb = torch.nn.Embedding(num_classes, emb_channels)
        ch = int(channel_mult[0] * model_channels)
        blocks = [TimestepSequential(torch.nn.Conv2d(in_channels, ch, 3, padding=1))]
        ds = 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [ResBlock(ch, emb_channels, int(mult * model_channels), dropout)]
                ch = int(mult * model_channels)
                if ds in attention_ds:
                    layers.append(AttentionBlock(ch, num_head_channels))
                blocks.append(TimestepSequential(*layers))
            if level != len(channel_mult) - 1:
                blocks.append(TimestepSequential(ResBlock(ch, emb_channels, ch, dropout, down=True)))
                ds *= 2
        self.input_blocks = torch.nn.ModuleList(blocks)
        self.middle_block = TimestepSequential(ResBlock(ch, emb_channels, dropout=dropout), AttentionBlock(ch, num_head_channels),
                                               ResBlock(ch, emb_channels, dropout=dropout))
        if out_channels:
            self.out = torch.nn.Sequential(GroupNorm32(ch), torch.nn.SiLU(),
                                           AttentionPool2d(img_resolution // ds, ch, num_head_channels, out_channels))
        self.feature_channels, self.feature_resolution = ch, img_resolution // ds

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Small extractors saved before they lost their unused output pool carry its weights: ignored.
        if not self.out_channels:
            for key in [k for k in state_dict if k.startswith(prefix + 'out.')]:
                del state_dict[key]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x, timesteps, feature=False, sigmoid=False, condition=None):
        """x [N, C, H, W] at VP times `timesteps` [N] in [0, 1]; condition: one-hot [N, K] or indices [N]."""
        emb = self.time_embed(timestep_embedding(timesteps * 999, self.model_channels))
        if self.num_classes:
            if condition is None:
                raise ValueError('this discriminator head is class-conditional: pass condition=class labels')
            emb = emb + self.label_emb(condition if condition.ndim == 1 else condition.argmax(dim=1))
        h = x.float()
        for block in self.input_blocks:
            h = block(h, emb)
        h = self.middle_block(h, emb)
        if feature or not self.out_channels:
            return h
        out = self.out(h)
        return torch.sigmoid(out) if sigmoid else out

def _channel_mult(img_resolution):
    # guided-diffusion's create_classifier table.
    table = {512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4), 32: (1, 2, 4), 16: (1, 2), 8: (1,)}
    if img_resolution not in table:
        raise ValueError(f'no ADM classifier for resolution {img_resolution}; choose one of {sorted(table)}')
    return table[img_resolution]

def _attention_ds(img_resolution, resolutions=(32, 16, 8)):
    return tuple(img_resolution // r for r in resolutions)

def adm_classifier(img_resolution=32, in_channels=3):
    """DG's feature extractor: ADM's noise-conditional ImageNet classifier (width 128, depth 4,
    attention at 32/16/8, 1000 classes), as DG's load_classifier builds it for 32x32_classifier.pt."""
    return EncoderUNet(img_resolution, in_channels, 128, ADM_NUM_CLASSES, 4 if img_resolution in (32, 64) else 2,
                       _attention_ds(img_resolution), _channel_mult(img_resolution))

def discriminator_head(cond=False, in_channels=512, feature_resolution=8, model_channels=128, depth=2,
                       num_head_channels=64, num_classes=ADM_NUM_CLASSES):
    """DG's discriminator head on extractor features; defaults are DG's (discriminator_60.pt,
    discriminator_250.pt with cond=True). One output; sigmoid=True gives P(real)."""
    return EncoderUNet(feature_resolution, in_channels, model_channels, 1, depth, _attention_ds(feature_resolution),
                       _channel_mult(feature_resolution), num_head_channels, num_classes if cond else 0)

def small_encoder(img_resolution, img_channels, model_channels=32, depth=1):
    """A small noise-conditional encoder of the same family, for data without a pretrained extractor:
    it down-samples to 8x8 (or keeps a smaller size) and is trained here together with the head.
    Features only: no output pool."""
    levels = max(int(round(math.log2(img_resolution / 8))), 0) + 1
    if img_resolution != 8 * 2 ** (levels - 1) and img_resolution > 8 or img_resolution & (img_resolution - 1):
        raise ValueError(f'image resolution {img_resolution} is not a power of two')
    mult = tuple(2 ** i for i in range(levels))
    return EncoderUNet(img_resolution, img_channels, model_channels, 0, depth, (2 ** (levels - 1),), mult,
                       num_head_channels=model_channels)

#----------------------------------------------------------------------------
# DG's VP SDE: EDM sigma <-> VP time, the VP mean and std, importance-sampled training times.

def vp_time(sigma):
    """VP time t with sigma_VE(t) = sigma, i.e. exp(int_0^t beta) = 1 + sigma^2."""
    b0, b1 = VP_BETA_0, VP_BETA_1
    return (-b0 + torch.sqrt(b0 ** 2 + 2 * (b1 - b0) * torch.log(1 + sigma ** 2))) / (b1 - b0)

def _int_beta(t):
    return 0.5 * t ** 2 * (VP_BETA_1 - VP_BETA_0) + t * VP_BETA_0

def vp_mean_std(t):
    """Mean coefficient and std of the VP perturbation at time t: x_t = mean * x_0 + std * z."""
    log_mean = -0.5 * _int_beta(t)
    return torch.exp(log_mean), torch.sqrt(1 - torch.exp(2 * log_mean))

def _vp_antiderivative(t):
    t = torch.as_tensor(t, dtype=torch.float32)
    return torch.log(1 - torch.exp(-_int_beta(t))) + _int_beta(t)

def importance_sampled_times(n, t_min=1e-5, generator=None, device='cpu'):
    """DG's training times: density proportional to the likelihood weight g^2/std^2 on [t_min, 1]."""
    lo = _vp_antiderivative(t_min)
    z = _vp_antiderivative(1.0) - lo
    u = torch.rand(n, generator=generator, device=device)
    b0, b1 = VP_BETA_0, VP_BETA_1
    return (-b0 + torch.sqrt(b0 ** 2 + 2 * (b1 - b0) * torch.log(1 + torch.exp(z * u + lo)))) / (b1 - b0)

#----------------------------------------------------------------------------
# A discriminator: extractor + head, in one module that the safe format stores.

@persistence.persistent_class
class Discriminator(torch.nn.Module):
    """d(x_t, t) = P(real | x_t) for VP states x_t at VP times t.

    extractor='adm': DG's 32x32 ADM classifier (frozen), head on its [N, 512, 8, 8] features.
    extractor='small': small_encoder at the data's resolution and channels, trained with the head.
    label_dim: the classes of the data the head was trained on (0: unconditional head)."""

    def __init__(self, img_resolution, img_channels, label_dim=0, extractor='adm', width=32, head_width=None, head_depth=None):
        super().__init__()
        self.img_resolution, self.img_channels, self.label_dim, self.extractor = img_resolution, img_channels, label_dim, extractor
        if extractor == 'adm':
            if (img_resolution, img_channels) != (32, 3):
                raise ValueError(f'DG\'s ADM classifier takes 32x32 RGB images, not {img_resolution}x{img_resolution}x{img_channels}')
            self.classifier = adm_classifier(img_resolution, img_channels).requires_grad_(False) # frozen, as in DG
            head = dict(model_channels=head_width or 128, depth=head_depth or 2)
        elif extractor == 'small':
            self.classifier = small_encoder(img_resolution, img_channels, width)
            head = dict(model_channels=head_width or width, depth=head_depth or 1, num_head_channels=head_width or width)
        else:
            raise ValueError(f'unknown extractor {extractor!r}: choose adm or small')
        self.head = discriminator_head(cond=label_dim > 0, in_channels=self.classifier.feature_channels,
                                       feature_resolution=self.classifier.feature_resolution,
                                       num_classes=max(label_dim, ADM_NUM_CLASSES if extractor == 'adm' else 0), **head)

    @property
    def trains_extractor(self):
        return self.extractor != 'adm'

    def forward(self, x, t, class_labels=None):
        features = self.classifier(x, t, feature=True)
        return self.head(features, t, sigmoid=True, condition=class_labels if self.label_dim else None).view(-1)

def load_dg_checkpoints(classifier_pt, head_pt, device='cpu'):
    """A Discriminator from DG's published .pt files (state dicts; loaded without running code).
    Conditional if the head has a label table; its label_dim is then the table size (1000)."""
    def read(path):
        try:
            return torch.load(path, map_location='cpu', weights_only=True)
        except Exception as err:
            raise IOError(f'Cannot read DG checkpoint {path}: {type(err).__name__}: {err}') from err
    classifier_state, head_state = read(classifier_pt), read(head_pt)
    label_dim = head_state['label_emb.weight'].shape[0] if 'label_emb.weight' in head_state else 0
    disc = Discriminator(32, 3, label_dim=label_dim, extractor='adm')
    for module, state, path in [(disc.classifier, classifier_state, classifier_pt), (disc.head, head_state, head_pt)]:
        try:
            module.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise IOError(f'{path} does not fit DG\'s architecture: {" ".join(str(err).split())[:300]}') from err
    disc.published_dg = True # the label table size says nothing about the classes it was trained on
    return disc.eval().requires_grad_(False).to(device)

def load_discriminator(path_or_url, device='cpu', verbose=True):
    """A Discriminator from a .safetensors file written by train_discriminator.py (runs no code)."""
    import dnnlib
    from training.network_io import load_safe
    try:
        path = dnnlib.util.open_url(path_or_url, verbose=verbose, return_filename=True)
        disc = load_safe(path, device=device)
    except Exception as err:
        raise IOError(f'Cannot load discriminator {path_or_url}: {" ".join(str(err).split())}') from err
    if not isinstance(disc, Discriminator):
        raise IOError(f'{path_or_url} holds a {type(disc).__name__}, not a discriminator; give the discriminator-*.safetensors of train_discriminator.py')
    return disc.requires_grad_(False)

def incompatibility(disc, net):
    """Why the discriminator cannot guide the network (one line), or None if it can."""
    shape = lambda r, c: f'{r}x{r} images with {c} channel{"s" * (c != 1)}'
    if (disc.img_resolution, disc.img_channels) != (net.img_resolution, net.img_channels):
        return (f'the discriminator takes {shape(disc.img_resolution, disc.img_channels)}, '
                f'but the network makes {shape(net.img_resolution, net.img_channels)}')
    if disc.label_dim and not net.label_dim:
        return 'the discriminator head is class-conditional, but the network is unconditional; use an unconditional discriminator'
    if disc.label_dim and net.label_dim:
        # DG's published heads have a 1000-entry table whatever they were trained on.
        published = getattr(disc, 'published_dg', False)
        if (net.label_dim > disc.label_dim) if published else (net.label_dim != disc.label_dim):
            return f'the discriminator was trained on {disc.label_dim} classes, but the network has {net.label_dim}'
    return None

#----------------------------------------------------------------------------
# DG at sampling time lives in sampling/guidance.py; its names stay importable from here.

_SAMPLING_NAMES = ('DiscriminatorGuidance', 'GuidedDenoiser', 'guided_edm_sampler', 'dg_slope', 'dg_boost_churn', 'per_sample',
                   'DG_BOOST_PERIOD', 'DG_BOOST_WEIGHT_PERIOD', 'DG_BOOST_CHURN')

def __getattr__(name): # imported on first use: sampling.guidance imports this module
    if name in _SAMPLING_NAMES:
        from sampling import guidance
        return getattr(guidance, name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')

#----------------------------------------------------------------------------
