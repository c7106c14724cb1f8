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
    # AttentionOp's hand-written backward equals autograd through a plain softmax.
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn([2, 8, 5], generator=g), torch.randn([2, 8, 5], generator=g)
    dw = torch.randn([2, 5, 5], generator=g)
    q1, k1 = q.clone().requires_grad_(), k.clone().requires_grad_()
    networks.AttentionOp.apply(q1, k1).backward(dw)
    q2, k2 = q.clone().requires_grad_(), k.clone().requires_grad_()
    torch.einsum('ncq,nck->nqk', q2, k2 / np.sqrt(8)).softmax(dim=2).backward(dw)
    assert torch.allclose(q1.grad, q2.grad, atol=1e-6) and torch.allclose(k1.grad, k2.grad, atol=1e-6)

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
