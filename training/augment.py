"""Non-leaking augmentation pipeline of the paper "Elucidating the Design
Space of Diffusion-Based Generative Models" (EDM), after the ADA pipeline of
"Training Generative Adversarial Networks with Limited Data".

Every transformation is drawn per image, applied, and reported in
`augment_labels` so that the network can be conditioned on it; at sampling
time the labels are zero and the network generates un-augmented images.
The class name, constructor arguments, order of random draws and label layout
are EDM's: EDM snapshots pickle `augment_pipe`, and EDM's train.py setting
(xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1) gives
the 9-dimensional labels [xflip, yflip, scale, rot cos-1, rot sin,
aniso w*cos, aniso w*sin, translate x, translate y]."""

import numpy as np
import torch
import torch.nn.functional as F
from torch_utils import persistence
from torch_utils import misc

# Low-pass decomposition filter of the Symlet-6 wavelet: used to resample at
# 2x resolution so that rotation and scaling do not alias.
SYM6 = [0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633,
    0.4910559419267466, 0.787641141030194, 0.3379294217276218, -0.07263752278646252,
    -0.021060292512300564, 0.04472490177066578, 0.0017677118642428036, -0.007800708325034148]

# Unit luma axis of homogeneous RGB, float32 as the color matrices.
LUMA = (np.asarray([1, 1, 1, 0]) / np.sqrt(3)).astype(np.float32)

# Values per resampling chunk: the resampler's buffers (the image at 2x with its reflected padding,
# the sampling grid) take up to ~250 bytes per image value, so a chunk stays under ~0.25 GB.
CHUNK_VALUES = 1 << 20

#----------------------------------------------------------------------------
# Batched homogeneous matrices from rows of python numbers or [N] tensors.
# Numbers become filled tensors: a kernel each, no copy from the host.

def _matrix(rows, n, device):
    def entry(v):
        if isinstance(v, torch.Tensor):
            return v.to(torch.float32).expand(n)
        return torch.full([n], v, dtype=torch.float32, device=device)
    return torch.stack([torch.stack([entry(v) for v in row], dim=-1) for row in rows], dim=-2)

# Pinned and asynchronous, so the host never waits for the device's queue. (Not shared with
# training/pools.py: the source of AugmentPipe is pickled with snapshots and imports only torch_utils.)
def _upload(t, device):
    if t.device.type == 'cpu' and device.type == 'cuda':
        t = t.pin_memory()
    return t.to(device, non_blocking=True)

def _translate2d(tx, ty, n, device):
    return _matrix([[1, 0, tx], [0, 1, ty], [0, 0, 1]], n, device)

def _scale2d(sx, sy, n, device):
    return _matrix([[sx, 0, 0], [0, sy, 0], [0, 0, 1]], n, device)

def _rotate2d(theta, n, device):
    return _matrix([[theta.cos(), -theta.sin(), 0], [theta.sin(), theta.cos(), 0], [0, 0, 1]], n, device)

def _translate3d(t, n, device):
    return _matrix([[1, 0, 0, t], [0, 1, 0, t], [0, 0, 1, t], [0, 0, 0, 1]], n, device)

def _scale3d(s, n, device):
    return _matrix([[s, 0, 0, 0], [0, s, 0, 0], [0, 0, s, 0], [0, 0, 0, 1]], n, device)

def _rotate3d(axis, theta, n, device):
    # Rodrigues' formula about a fixed unit axis (numbers): cos*I + sin*[axis]_x + (1-cos)*axis*axis^T.
    x, y, z = axis[:3]
    c, s = theta.cos(), theta.sin()
    k = 1 - c
    return _matrix([
        [c + x*x*k,   x*y*k - z*s, x*z*k + y*s, 0],
        [y*x*k + z*s, c + y*y*k,   y*z*k - x*s, 0],
        [z*x*k - y*s, z*y*k + x*s, c + z*z*k,   0],
        [0,           0,           0,           1]], n, device)

#----------------------------------------------------------------------------
# Reflect padding [x0, x1, y0, y1] (python ints) that the inverse maps G_inv
# [N, 3, 3] need: enough for every output corner (plus the filter support) to
# land inside the image, as far as possible. Computed once for all the images
# of a call, so that resampling them in chunks gives the same result.

def _padding(G_inv, H, W):
    support = len(SYM6) // 4 # extra pixels per side that the filters reach, in original resolution
    cx, cy = (W - 1) / 2, (H - 1) / 2
    device = G_inv.device
    corners = misc.constant([[-cx, cx, cx, -cx], [-cy, -cy, cy, cy], [1, 1, 1, 1]], device=device)
    src = (G_inv @ corners)[:, :2, :].transpose(0, 1).flatten(1) # [xy, N * corners]
    lo = (-src).amax(dim=1) + 2 * support - misc.constant([cx, cy], device=device)
    hi = src.amax(dim=1) + 2 * support - misc.constant([cx, cy], device=device)
    limit = misc.constant([W - 1, H - 1], device=device)
    (px0, py0), (px1, py1) = [m.clamp(min=0).minimum(limit).ceil().to(torch.int64).tolist() for m in (lo, hi)]
    return [px0, px1, py0, py1]

#----------------------------------------------------------------------------
# Resample every image with its own inverse affine map G_inv [N, 3, 3], which
# takes output pixel coordinates to input pixel coordinates, both relative to
# the image center. Works at 2x resolution with the SYM6 filter: up-filtering,
# bilinear sampling on the 2x grid, down-filtering. Content that the map pulls
# from outside the image is a reflection of it (zeros further out).

def _resample(images, G_inv, pad=None):
    N, C, H, W = images.shape
    device = images.device
    taps = len(SYM6)
    cx, cy = (W - 1) / 2, (H - 1) / 2
    px0, px1, py0, py1 = _padding(G_inv, H, W) if pad is None else pad
    x = F.pad(images, [px0, px1, py0, py1], mode='reflect')

    # Upsample 2x. The filter delays by about 5 taps (its center of mass is at 5.1), so pixel 2i of the
    # result sits on padded-input pixel i; EDM aligns the same way.
    delay = taps // 2 - 1
    filt = _upload(torch.tensor(SYM6, dtype=images.dtype), device)
    x = F.conv_transpose2d(x, filt.reshape(1, 1, 1, taps).repeat(C, 1, 1, 1), stride=[1, 2], padding=[0, delay], groups=C)
    x = F.conv_transpose2d(x, filt.reshape(1, 1, taps, 1).repeat(C, 1, 1, 1), stride=[2, 1], padding=[delay, 0], groups=C)

    # Sample a 2x output grid whose pixel 2o + delay the stride-2 down-filter below turns into output pixel o.
    def out_coords(size, center):
        q = torch.arange(2 * size + taps - 2, device=device, dtype=torch.float32)
        return (q - delay) / 2 - center
    oy, ox = torch.meshgrid(out_coords(H, cy), out_coords(W, cx), indexing='ij')
    # Centered input coordinates, elementwise: a matrix product would round differently for one image than for many.
    G = G_inv[:, :2, :, None, None] # [N, xy, 3, 1, 1]
    src_x = G[:, 0, 0] * ox + G[:, 0, 1] * oy + G[:, 0, 2]
    src_y = G[:, 1, 0] * ox + G[:, 1, 1] * oy + G[:, 1, 2]
    Hu, Wu = x.shape[2], x.shape[3]
    up_x = (src_x + cx + px0) * 2
    up_y = (src_y + cy + py0) * 2
    grid = torch.stack([(up_x + 0.5) * (2 / Wu) - 1, (up_y + 0.5) * (2 / Hu) - 1], dim=-1).to(images.dtype)
    x = F.grid_sample(x, grid, mode='bilinear', padding_mode='zeros', align_corners=False)

    # Downsample 2x.
    x = F.conv2d(x, filt.reshape(1, 1, 1, taps).repeat(C, 1, 1, 1), stride=[1, 2], groups=C)
    x = F.conv2d(x, filt.reshape(1, 1, taps, 1).repeat(C, 1, 1, 1), stride=[2, 1], groups=C)
    return x

#----------------------------------------------------------------------------
# Augmentation pipeline. Each augmentation is off by default; its argument is
# a probability multiplier (times the overall p).

@persistence.persistent_class
class AugmentPipe:
    def __init__(self, p=1,
        xflip=0, yflip=0, rotate_int=0, translate_int=0, translate_int_max=0.125,
        scale=0, rotate_frac=0, aniso=0, translate_frac=0, scale_std=0.2, rotate_frac_max=1, aniso_std=0.2, aniso_rotate_prob=0.5, translate_frac_std=0.125,
        brightness=0, contrast=0, lumaflip=0, hue=0, saturation=0, brightness_std=0.2, contrast_std=0.5, hue_max=1, saturation_std=1,
    ):
        super().__init__()
        self.p                  = float(p)                  # Overall multiplier of all probabilities.

        # Pixel blitting (exact, no resampling).
        self.xflip              = float(xflip)              # Horizontal flip.
        self.yflip              = float(yflip)              # Vertical flip.
        self.rotate_int         = float(rotate_int)         # Rotation by a multiple of 90 degrees.
        self.translate_int      = float(translate_int)      # Integer translation with reflection at the border.
        self.translate_int_max  = float(translate_int_max)  # Its range, relative to the image size.

        # General geometric transformations (resampled).
        self.scale              = float(scale)              # Isotropic scaling.
        self.rotate_frac        = float(rotate_frac)        # Arbitrary rotation.
        self.aniso              = float(aniso)              # Anisotropic scaling.
        self.translate_frac     = float(translate_frac)     # Fractional translation.
        self.scale_std          = float(scale_std)          # Log2 standard deviation of isotropic scaling.
        self.rotate_frac_max    = float(rotate_frac_max)    # Range of rotation, 1 = full circle.
        self.aniso_std          = float(aniso_std)          # Log2 standard deviation of anisotropic scaling.
        self.aniso_rotate_prob  = float(aniso_rotate_prob)  # Probability of anisotropic scaling along rotated axes.
        self.translate_frac_std = float(translate_frac_std) # Standard deviation of translation, relative to the image size.

        # Color transformations.
        self.brightness         = float(brightness)         # Additive brightness.
        self.contrast           = float(contrast)           # Multiplicative contrast.
        self.lumaflip           = float(lumaflip)           # Inversion of luma.
        self.hue                = float(hue)                # Rotation of hue.
        self.saturation         = float(saturation)         # Saturation scaling.
        self.brightness_std     = float(brightness_std)     # Standard deviation of brightness.
        self.contrast_std       = float(contrast_std)       # Log2 standard deviation of contrast.
        self.hue_max            = float(hue_max)            # Range of hue rotation, 1 = full circle.
        self.saturation_std     = float(saturation_std)     # Log2 standard deviation of saturation.

    def __call__(self, images, generator=None):
        # generator: the torch.Generator to draw from, None = the default one of the images' device.
        # The parameters of all images are drawn first, on the generator's device (a CPU generator
        # for CUDA images: no wait for the device at all), in EDM's order; they are then applied in
        # chunks of about CHUNK_VALUES values, which bounds the memory and does not change the result.
        if images.ndim != 4:
            raise ValueError(f'AugmentPipe expects images of shape [N, C, H, W], got {list(images.shape)}')
        N, C, H, W = images.shape
        params, labels = self._draw(N, H, W, images.device if generator is None else generator.device, generator)
        pad = _padding(params['G_inv'], H, W) if 'G_inv' in params else None
        params = {key: _upload(val, images.device) for key, val in params.items()}
        if not params:
            return images, _upload(labels, images.device)
        step = max(CHUNK_VALUES // (C * H * W), 1)
        out = torch.empty_like(images)
        for start in range(0, N, step):
            part = slice(start, start + step)
            out[part] = self._apply(images[part], {key: val[part] for key, val in params.items()}, pad)
        return out, _upload(labels, images.device)

    def _draw(self, N, H, W, device, generator):
        # Per-image parameters {name: [N, ...] tensor} on `device` and the augment labels [N, L].
        params = {}
        labels = [torch.zeros([N, 0], device=device)]

        # Keep value w where an augmentation fires (probability prob * p), zero elsewhere.
        def gate(w, prob, shape):
            return torch.where(torch.rand(shape, device=device, generator=generator) < prob * self.p, w, torch.zeros_like(w))

        # Pixel blitting.
        if self.xflip > 0:
            w = gate(torch.randint(2, [N, 1, 1, 1], device=device, generator=generator), self.xflip, [N, 1, 1, 1])
            params['xflip'] = w
            labels.append(w)

        if self.yflip > 0:
            w = gate(torch.randint(2, [N, 1, 1, 1], device=device, generator=generator), self.yflip, [N, 1, 1, 1])
            params['yflip'] = w
            labels.append(w)

        if self.rotate_int > 0:
            w = gate(torch.randint(4, [N, 1, 1, 1], device=device, generator=generator), self.rotate_int, [N, 1, 1, 1])
            params['rotate_int'] = w
            labels += [(w == 1) | (w == 2), (w == 2) | (w == 3)]

        if self.translate_int > 0:
            w = gate(torch.rand([2, N, 1, 1, 1], device=device, generator=generator) * 2 - 1, self.translate_int, [1, N, 1, 1, 1])
            params['tx'] = (w[0] * (W * self.translate_int_max)).round().to(torch.int64)
            params['ty'] = (w[1] * (H * self.translate_int_max)).round().to(torch.int64)
            labels += [params['tx'] / (W * self.translate_int_max), params['ty'] / (H * self.translate_int_max)]

        # General geometric transformations, composed into one inverse map.
        G_inv = None
        def compose(G, M):
            return M if G is None else G @ M

        if self.scale > 0:
            w = gate(torch.randn([N], device=device, generator=generator), self.scale, [N])
            s = (w * self.scale_std).exp2()
            G_inv = compose(G_inv, _scale2d(1 / s, 1 / s, N, device))
            labels.append(w)

        if self.rotate_frac > 0:
            w = gate((torch.rand([N], device=device, generator=generator) * 2 - 1) * (np.pi * self.rotate_frac_max), self.rotate_frac, [N])
            G_inv = compose(G_inv, _rotate2d(w, N, device))
            labels += [w.cos() - 1, w.sin()]

        if self.aniso > 0:
            w = torch.randn([N], device=device, generator=generator)
            r = (torch.rand([N], device=device, generator=generator) * 2 - 1) * np.pi
            w = gate(w, self.aniso, [N])
            r = torch.where(torch.rand([N], device=device, generator=generator) < self.aniso_rotate_prob, r, torch.zeros_like(r))
            s = (w * self.aniso_std).exp2()
            G_inv = compose(G_inv, _rotate2d(-r, N, device) @ _scale2d(1 / s, s, N, device) @ _rotate2d(r, N, device))
            labels += [w * r.cos(), w * r.sin()]

        if self.translate_frac > 0:
            w = gate(torch.randn([2, N], device=device, generator=generator), self.translate_frac, [1, N])
            G_inv = compose(G_inv, _translate2d(-w[0] * (W * self.translate_frac_std), -w[1] * (H * self.translate_frac_std), N, device))
            labels += [w[0], w[1]]

        if G_inv is not None:
            params['G_inv'] = G_inv

        # Color transformations, composed into one 4x4 matrix on homogeneous RGB.
        M = None
        luma = misc.constant(LUMA, device=device)
        eye = torch.eye(4, device=device)
        def chain(M, T):
            return T if M is None else T @ M

        if self.brightness > 0:
            w = gate(torch.randn([N], device=device, generator=generator), self.brightness, [N])
            M = chain(M, _translate3d(w * self.brightness_std, N, device))
            labels.append(w)

        if self.contrast > 0:
            w = gate(torch.randn([N], device=device, generator=generator), self.contrast, [N])
            M = chain(M, _scale3d((w * self.contrast_std).exp2(), N, device))
            labels.append(w)

        if self.lumaflip > 0:
            w = gate(torch.randint(2, [N, 1, 1], device=device, generator=generator), self.lumaflip, [N, 1, 1])
            M = chain(M, eye - 2 * torch.outer(luma, luma) * w)
            labels.append(w)

        if self.hue > 0:
            w = gate((torch.rand([N], device=device, generator=generator) * 2 - 1) * (np.pi * self.hue_max), self.hue, [N])
            M = chain(M, _rotate3d(LUMA.tolist(), w, N, device))
            labels += [w.cos() - 1, w.sin()]

        if self.saturation > 0:
            w = gate(torch.randn([N, 1, 1], device=device, generator=generator), self.saturation, [N, 1, 1])
            along = torch.outer(luma, luma)
            M = chain(M, along + (eye - along) * (w * self.saturation_std).exp2())
            labels.append(w)

        if M is not None:
            params['M'] = M
        return params, torch.cat([x.to(torch.float32).reshape(N, -1) for x in labels], dim=1)

    def _apply(self, images, params, pad):
        # The drawn transformations, in EDM's order, to a chunk of images and its slice of params.
        N, C, H, W = images.shape
        device = images.device
        if 'xflip' in params:
            images = torch.where(params['xflip'] == 1, images.flip(3), images)

        if 'yflip' in params:
            images = torch.where(params['yflip'] == 1, images.flip(2), images)

        if 'rotate_int' in params:
            w = params['rotate_int']
            # Quarter turns w as flips and a transpose: w=1 x-flip+transpose, w=2 both flips, w=3 y-flip+transpose.
            images = torch.where((w == 1) | (w == 2), images.flip(3), images)
            images = torch.where((w == 2) | (w == 3), images.flip(2), images)
            images = torch.where((w == 1) | (w == 3), images.transpose(2, 3), images)

        if 'tx' in params:
            # Output pixel (x, y) reads input (x - tx, y + ty), reflected at the border (EDM's convention).
            xs = torch.arange(W, device=device).reshape(1, 1, 1, W) - params['tx']
            ys = torch.arange(H, device=device).reshape(1, 1, H, 1) + params['ty']
            xs = (W - 1) - ((W - 1) - xs % (2 * W - 2)).abs()
            ys = (H - 1) - ((H - 1) - ys % (2 * H - 2)).abs()
            images = images.gather(2, ys.expand(N, C, H, W)).gather(3, xs.expand(N, C, H, W))

        if 'G_inv' in params:
            images = _resample(images, params['G_inv'], pad)

        if 'M' in params:
            M = params['M']
            flat = images.reshape(N, C, H * W)
            if C == 3:
                flat = M[:, :3, :3] @ flat + M[:, :3, 3:]
            elif C == 1:
                # Grayscale: average the effect over the three color rows.
                M = M[:, :3, :].mean(dim=1, keepdim=True)
                flat = flat * M[:, :, :3].sum(dim=2, keepdim=True) + M[:, :, 3:]
            else:
                raise ValueError(f'AugmentPipe color transformations need 1 or 3 channels, got {C}')
            images = flat.reshape(N, C, H, W)
        return images

#----------------------------------------------------------------------------
