"""training/networks.py against EDM's golden networks (tests/golden/networks, see README.md there)."""

import glob
import json
import os
import pickle

import numpy as np
import pytest
import torch

from training import networks

GOLDEN = os.path.join(os.path.dirname(__file__), 'golden', 'networks')
CASES = sorted(os.path.basename(p)[:-5] for p in glob.glob(os.path.join(GOLDEN, '*.json')))

def test_all_cases_present():
    assert len(CASES) == 7, f'expected 7 golden network cases in {GOLDEN}, found {CASES}'

def load_case(name):
    with open(os.path.join(GOLDEN, f'{name}.json')) as f:
        meta = json.load(f)
    data = np.load(os.path.join(GOLDEN, f'{name}.npz'), allow_pickle=False)
    return meta, data

def build(meta, data, **overrides):
    net = getattr(networks, meta['precond_class'])(**{**meta['constructor_kwargs'], **overrides})
    state = {k[len('state/'):]: torch.from_numpy(data[k]) for k in data.files if k.startswith('state/')}
    net.load_state_dict(state, strict=True)
    return net.eval().requires_grad_(False)

def call(net, data):
    labels = torch.from_numpy(data['class_labels']) if 'class_labels' in data.files else None
    return net(torch.from_numpy(data['x']), torch.from_numpy(data['sigma']), labels,
        force_fp32=True, augment_labels=torch.from_numpy(data['augment_labels']))

def as_float(v):
    return float('inf') if v == 'inf' else v

@pytest.mark.parametrize('name', CASES)
def test_golden_output(name):
    meta, data = load_case(name)
    net = build(meta, data)
    out = call(net, data).numpy()
    ref = data['out']
    tol = meta['tolerance']['suggested']['per_sample_rel_to_max_abs']
    assert out.shape == ref.shape and out.dtype == np.float32
    for i in range(len(ref)):
        rel = np.abs(out[i] - ref[i]).max() / np.abs(ref[i]).max()
        assert rel <= tol, f'{name} sample {i} (sigma={data["sigma"][i]}): relative error {rel:.3g} > {tol}'

@pytest.mark.parametrize('name', CASES)
def test_state_dict_and_attributes(name):
    meta, data = load_case(name)
    torch.manual_seed(0)
    net = getattr(networks, meta['precond_class'])(**meta['constructor_kwargs'])
    state = net.state_dict()
    assert [(k, list(v.shape)) for k, v in state.items()] == [(e['key'], e['shape']) for e in meta['state_dict']]
    buffers = {e['key'] for e in meta['state_dict'] if e['kind'] == 'buffer'}
    assert {k for k, _ in net.named_buffers()} == buffers
    assert sum(p.numel() for p in net.parameters()) == meta['num_parameters']
    # Deterministic buffers are built as EDM builds them. iDDPM's u comes from a float32 recursion
    # over sin(); the golden machine's libm differs from ours by a few ulps, which accumulate.
    for key in buffers - {'model.map_noise.freqs'}:
        ref = torch.from_numpy(data['state/' + key])
        assert torch.allclose(state[key], ref, rtol=2e-6, atol=0) if key == 'u' else torch.equal(state[key], ref), key
    for attr, value in meta['precond_attributes'].items():
        assert getattr(net, attr) == pytest.approx(as_float(value), rel=2e-6), attr

@pytest.mark.parametrize('name', CASES)
def test_round_sigma(name):
    meta, data = load_case(name)
    net = build(meta, data)
    sigma = torch.from_numpy(data['sigma'])
    expected = meta.get('round_sigma', {}).get('output', data['sigma'].tolist()) # identity unless listed
    assert net.round_sigma(sigma).tolist() == pytest.approx(expected, rel=0, abs=0)
    if 'index' in meta.get('round_sigma', {}):
        assert net.round_sigma(sigma, return_index=True).tolist() == meta['round_sigma']['index']

@pytest.mark.parametrize('name', ['ddpmpp_edm_cond', 'adm_iddpm_cond'])
def test_preconditioner_split(name):
    # What the preconditioner feeds the U-Net (c_in*x, c_noise) and the U-Net's raw output.
    meta, data = load_case(name)
    net = build(meta, data)
    seen = {}
    net.model.register_forward_hook(lambda m, args, kwargs, out: seen.update(x=args[0], noise=args[1], F=out), with_kwargs=True)
    call(net, data)
    assert torch.equal(seen['x'], torch.from_numpy(data['model_x_in']))
    assert torch.equal(seen['noise'], torch.from_numpy(data['model_noise_labels']))
    ref = data['model_F_out']
    assert np.abs(seen['F'].numpy() - ref).max() <= 1e-5 * np.abs(ref).max()

@pytest.mark.parametrize('name', ['ncsnpp_edm_cond', 'adm_edm_cond'])
def test_fp16_flag_keeps_cpu_in_fp32(name):
    meta, data = load_case(name)
    ref = call(build(meta, data), data)
    net = build(meta, data, use_fp16=True)
    labels = torch.from_numpy(data['class_labels'])
    out = net(torch.from_numpy(data['x']), torch.from_numpy(data['sigma']), labels,
        augment_labels=torch.from_numpy(data['augment_labels'])) # force_fp32=False
    assert out.dtype == torch.float32 and torch.equal(out, ref)

def test_pickle_roundtrip():
    meta, data = load_case('ncsnpp_edm_cond')
    net = build(meta, data)
    clone = pickle.loads(pickle.dumps(net))
    assert type(clone).__name__ == 'EDMPrecond'
    assert clone.init_kwargs == meta['constructor_kwargs']
    assert torch.equal(call(clone, data), call(net, data))

def test_attention_gradient():
    # AttentionOp's own backward equals autograd through a plain softmax.
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn([2, 8, 5], generator=g), torch.randn([2, 8, 5], generator=g)
    dw = torch.randn([2, 5, 5], generator=g)
    q1, k1 = q.clone().requires_grad_(), k.clone().requires_grad_()
    networks.AttentionOp.apply(q1, k1).backward(dw)
    q2, k2 = q.clone().requires_grad_(), k.clone().requires_grad_()
    torch.einsum('ncq,nck->nqk', q2, k2 / np.sqrt(8)).softmax(dim=2).backward(dw)
    assert torch.allclose(q1.grad, q2.grad, atol=1e-6) and torch.allclose(k1.grad, k2.grad, atol=1e-6)

def test_attention_fp16():
    # fp16 in, fp16 weights and gradients out; the softmax and its backward run in float32.
    g = torch.Generator().manual_seed(0)
    q, k, dw = torch.randn([2, 8, 5], generator=g), torch.randn([2, 8, 5], generator=g), torch.randn([2, 5, 5], generator=g)
    q16, k16 = q.half().requires_grad_(), k.half().requires_grad_()
    w16 = networks.AttentionOp.apply(q16, k16)
    w16.backward(dw.half())
    q32, k32 = q.half().float().requires_grad_(), k.half().float().requires_grad_()
    w32 = networks.AttentionOp.apply(q32, k32)
    w32.backward(dw.half().float())
    assert w16.dtype == q16.grad.dtype == k16.grad.dtype == torch.float16
    assert torch.allclose(w16.float(), w32, rtol=0, atol=2e-3) # k is scaled in fp16 before the float32 softmax, as in EDM
    assert torch.allclose(q16.grad.float(), q32.grad, rtol=1e-2, atol=1e-3) and torch.allclose(k16.grad.float(), k32.grad, rtol=1e-2, atol=1e-3)
    # Logits beyond fp16's range (q.k/sqrt(c) = 8*200*200/sqrt(8) > 65504) stay finite.
    q16, k16 = (torch.full([1, 8, 3], 200.0, dtype=torch.float16, requires_grad=True) for _ in range(2))
    w16 = networks.AttentionOp.apply(q16, k16)
    w16.sum().backward()
    assert torch.isfinite(w16).all() and torch.isfinite(q16.grad).all() and torch.isfinite(k16.grad).all()

def test_attention_float32_under_autocast():
    # bf16 autocast (--bf16) must not undo the float32 cast: the logits, softmax and backward run in
    # float32 there as without autocast, from the same inputs, so the gradient is that of the forward.
    g = torch.Generator().manual_seed(0)
    q, k, dw = (torch.randn(shape, generator=g).bfloat16() for shape in ([2, 8, 16], [2, 8, 16], [2, 16, 16]))
    for dtype in (torch.bfloat16, torch.float32): # the U-Net's bf16 activations; float32 ones that bf16 holds exactly
        ref_q, ref_k = (x.to(dtype, copy=True).requires_grad_() for x in (q, k))
        ref = networks.AttentionOp.apply(ref_q, ref_k)
        ref.backward(dw.to(dtype))
        auto_q, auto_k = (x.to(dtype, copy=True).requires_grad_() for x in (q, k))
        with torch.autocast('cpu', dtype=torch.bfloat16):
            w = networks.AttentionOp.apply(auto_q, auto_k)
            w.backward(dw.to(dtype)) # a backward inside the autocast region too
        assert w.dtype == dtype
        torch.testing.assert_close(w, ref, rtol=1e-6, atol=1e-7) # bf16 logits: ~0.5% off
        torch.testing.assert_close(auto_q.grad, ref_q.grad, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(auto_k.grad, ref_k.grad, rtol=1e-6, atol=1e-7)

def reference_resample(conv, x):
    """Conv2d's function from first principles, in float64: upsampling inserts zeros between pixels
    and filters with 4*f; downsampling filters and keeps every other pixel. Unfused, the resampling
    pads by f_pad and the convolution by w_pad. Fused, they pad once: upsampling keeps every pixel
    the filter reaches (f_pad beyond each side), which stands in for the convolution's padding, and
    downsampling convolves at full resolution first."""
    x = x.double()
    w = conv.weight.double() if conv.weight is not None else None
    f = conv.resample_filter.double() if conv.resample_filter is not None else None
    w_pad = w.shape[-1] // 2 if w is not None else 0
    f_pad = (f.shape[-1] - 1) // 2 if f is not None else 0
    fused = conv.fused_resample and w is not None and (conv.up or conv.down)
    pad = lambda x, p: torch.nn.functional.pad(x, [p] * 4) # p < 0 crops
    filt = lambda x, f: torch.nn.functional.conv2d(x, f.expand(x.shape[1], 1, -1, -1), groups=x.shape[1])
    if conv.up:
        z = torch.zeros([*x.shape[:2], 2 * x.shape[2] - 1, 2 * x.shape[3] - 1], dtype=x.dtype)
        z[:, :, ::2, ::2] = x
        x = filt(pad(z, f.shape[-1] - 1), 4 * f) # 2n + 2*f_pad pixels
        x = pad(x, w_pad - f_pad if fused else -f_pad)
    if conv.down and not fused:
        x = filt(pad(x, f_pad), f)[:, :, ::2, ::2]
    if w is not None:
        x = torch.nn.functional.conv2d(pad(x, 0 if fused and conv.up else w_pad + f_pad if fused else w_pad), w)
    if conv.down and fused:
        x = filt(x, f)[:, :, ::2, ::2]
    if conv.bias is not None:
        x = x + conv.bias.double().reshape(1, -1, 1, 1)
    return x

@pytest.mark.parametrize('resample_filter', [[1, 1], [1, 3, 3, 1]])
@pytest.mark.parametrize('kernel', [0, 1, 3])
@pytest.mark.parametrize('fused', [False, True])
@pytest.mark.parametrize('mode', ['up', 'down', 'none'])
def test_conv2d_resampling(mode, fused, kernel, resample_filter):
    # Shapes and values for every combination EDM's Conv2d accepts, fused upsampling included
    # (no EDM architecture uses it, so the golden networks do not cover it).
    torch.manual_seed(0)
    cout = 3 if kernel else 2
    conv = networks.Conv2d(2, cout, kernel=kernel, up=(mode == 'up'), down=(mode == 'down'),
        resample_filter=resample_filter, fused_resample=fused, init_bias=1)
    x = torch.randn([2, 2, 8, 8])
    out = conv(x)
    size = {'up': 16, 'down': 4, 'none': 8}[mode]
    assert out.shape == (2, cout, size, size)
    assert torch.allclose(out.double(), reference_resample(conv, x), rtol=0, atol=1e-5)

def test_conv2d_fused_upsampling():
    # Without the reference: [1,1] upsampling is nearest-neighbour, fused or not; fused [1,3,3,1]
    # convolves an upsampled image one pixel larger on each side than the unfused one.
    x = torch.randn([1, 2, 4, 4], generator=torch.Generator().manual_seed(0))
    near = x.repeat_interleave(2, 2).repeat_interleave(2, 3)
    assert torch.equal(networks.Conv2d(2, 2, kernel=0, up=True)(x), near)
    tap = torch.zeros([2, 2, 3, 3])
    tap[[0, 1], [0, 1], 1, 1] = 1 # identity
    conv = networks.Conv2d(2, 2, kernel=3, up=True, fused_resample=True)
    conv.weight.data = tap
    assert torch.equal(conv(x), near)
    tap = tap.roll((-1, -1), (2, 3)) # top-left tap: output = input shifted by one pixel
    conv = networks.Conv2d(2, 2, kernel=3, up=True, resample_filter=[1, 3, 3, 1], fused_resample=True)
    conv.weight.data = tap
    smooth = networks.Conv2d(2, 2, kernel=0, up=True, resample_filter=[1, 3, 3, 1])(x)
    assert torch.allclose(conv(x)[:, :, 1:, 1:], smooth[:, :, :-1, :-1], rtol=0, atol=1e-6)
    assert conv(x)[:, :, 0].abs().min() > 0 # the border is upsampled image, not zero padding

@pytest.mark.parametrize('encoder_type,decoder_type', [('skip', 'skip'), ('residual', 'skip'), ('skip', 'standard')])
def test_songunet_skip_variants_train(encoder_type, decoder_type):
    # Options that the golden cases do not cover: build, run in training mode with dropout and
    # label dropout, and backpropagate to every parameter.
    torch.manual_seed(0)
    net = networks.EDMPrecond(img_resolution=8, img_channels=2, label_dim=3, model_type='SongUNet',
        model_channels=8, channel_mult=[1, 2, 2], num_blocks=1, attn_resolutions=[4], dropout=0.1, label_dropout=0.5,
        augment_dim=9, encoder_type=encoder_type, decoder_type=decoder_type, resample_filter=[1, 3, 3, 1]).train()
    if decoder_type == 'skip':
        assert {'4x4_aux_up', '8x8_aux_up', '2x2_aux_conv', '4x4_aux_conv'} <= set(net.model.dec.keys())
    x = torch.randn([3, 2, 8, 8])
    out = net(x, torch.tensor([0.1, 1.0, 10.0]), torch.eye(3), augment_labels=torch.randn([3, 9]))
    assert out.shape == x.shape and torch.isfinite(out).all()
    out.square().sum().backward()
    assert all(p.grad is not None for p in net.parameters())

def test_unknown_model_type():
    with pytest.raises(ValueError, match='model_type'):
        networks.EDMPrecond(img_resolution=8, img_channels=3, model_type='UNet')
