"""Discriminator Guidance: DG's architecture, weights layout and math against DG's own outputs
(tests/golden/dg), the guided sampler, and the discriminator file format."""

import json
import os

import numpy as np
import pytest
import torch

from training import guidance
from sampling.denoisers import MinBatchNet
from sampling.edm import edm_sampler
from sampling.guidance import DiscriminatorGuidance, guided_edm_sampler, per_sample
from sampling.schedules import edm_time_steps
from sampling.seeds import latents_for_seeds
from training.guidance import (Discriminator, adm_classifier, discriminator_head,
                               vp_time, vp_mean_std)
from tests.helpers import with_output_pool

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
        # DG's encoder is ours, not DG's code, and these are sums over thousands of float32 terms: on
        # the CPUs tried (AVX2, AVX-512, no vectorisation) within 4e-6 of the largest value (15 for
        # the features); 3e-5 of it leaves a margin for other kernels and is far below any layer bug.
        for got, key in [(features, 'features'), (dg_modules['classifier'](x, t), 'classifier_logits')]:
            np.testing.assert_allclose(got.numpy(), ref[key], rtol=0, atol=3e-5 * np.abs(ref[key]).max(), err_msg=key)
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

# The fast tier keeps the plain and the boosted case; the other two run in the full suite.
@pytest.mark.parametrize('case', ['w0_plain', pytest.param('w2_first_only', marks=pytest.mark.slow),
                                  pytest.param('w1_cond', marks=pytest.mark.slow), 'w2_boosting'])
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
        images = guided_edm_sampler(net, latents, labels, randn_like=randn_like, guidance=dg, dg_weight=cfg['dg_weight_1st_order'],
                                      dg_weight_2nd=cfg['dg_weight_2nd_order'], dg_boosting=bool(cfg['boosting']), **kwargs)
        assert images.dtype == torch.float64
        # DG keeps its sigmas in float32 where this sampler keeps float64: differences of ~1e-5.
        np.testing.assert_allclose(images.numpy(), ref[case], rtol=0, atol=5e-5)
        if case == 'w0_plain': # weight 0 is EDM's sampler, and so is guidance=None
            assert torch.equal(images, edm_sampler(net, latents, labels, **kwargs))
    assert np.abs(ref[case] - ref['w0_plain']).max() > 0.1 or case == 'w0_plain' # the cases tell guidance apart

class GaussianDenoiser:
    """Ideal denoiser of N(0, 0.25 I) data, for per-sample noise levels too."""
    sigma_min, sigma_max, round_sigma = 0, float('inf'), staticmethod(torch.as_tensor)
    def __call__(self, x, sigma, class_labels=None):
        return x * 0.25 / (0.25 + per_sample(torch.as_tensor(sigma, dtype=torch.float64)) ** 2)

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
    out = guided_edm_sampler(net, latents, num_steps=4, guidance=guide, dg_weight=w1, dg_weight_2nd=w2)
    # DG's reference passes a 0-dim t_next at the second evaluation and crashes; here it works.
    assert [s.ndim for s in guide.calls] == [0] * 7
    # Direct computation: Heun steps with the slope d = (x - D) / t + w * c * x / t.
    t = edm_time_steps(4)
    x = latents.double() * t[0]
    slope = lambda x, s, w: (x - net(x, s)) / s + w * ((c * x).float() / s)
    for i in range(4):
        d = slope(x, t[i], w1)
        x_euler = x + (t[i + 1] - t[i]) * d
        x = x_euler if i == 3 else x + (t[i + 1] - t[i]) * 0.5 * (d + slope(x_euler, t[i + 1], w2))
    assert (out - x).abs().max() <= 1e-12 * x.abs().max()
    # The second-order weight matters; without it only the Euler evaluations are corrected.
    only_first = guided_edm_sampler(net, latents, num_steps=4, guidance=LinearGuidance(c), dg_weight=w1)
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
    guided_edm_sampler(net, latents, num_steps=11, randn_like=randn_like, guidance=HalfFake(0.0), dg_weight=1.0,
                         dg_boosting=True, callback=steps.append)
    assert len(draws) == 11 # one draw per step, as DG, so the noise stream does not depend on the decisions
    for s in steps:
        if s.i in (5, 10): # every 5th step after the first guided one: churn 4 for the fake sample only
            gamma = min(4 / 11, np.sqrt(2) - 1)
            assert torch.allclose(s.t_hat, torch.tensor([s.t_cur * (1 + gamma), s.t_cur], dtype=torch.float64))
        else:
            assert torch.as_tensor(s.t_hat).ndim == 0 and s.t_hat == s.t_cur and torch.equal(s.x_hat, s.x_cur)

#----------------------------------------------------------------------------
# generate.py with guidance.

def small_discriminator(res=16, channels=3, label_dim=10, seed=4):
    torch.manual_seed(seed)
    disc = Discriminator(res, channels, label_dim=label_dim, extractor='small', width=32)
    # Random heads have near-zero gradients; enlarge the weights so that guidance changes the images.
    fill_params(disc, seed)
    return disc.eval().requires_grad_(False)

@pytest.mark.parametrize('extractor,res,channels', [('small', 8, 1), ('adm', 32, 3)])
def test_every_trained_parameter_gets_a_gradient(extractor, res, channels):
    # As DDP requires (train_discriminator.py under torchrun): the small encoder has no output pool,
    # and DG's classifier (with its output pool, for its checkpoints' keys) is frozen.
    disc = Discriminator(res, channels, label_dim=4, extractor=extractor)
    disc(torch.randn([2, channels, res, res]), torch.tensor([0.1, 0.9]), torch.tensor([0, 3])).sum().backward()
    assert [name for name, p in disc.named_parameters() if p.requires_grad and p.grad is None] == []
    assert any(p.requires_grad for p in disc.head.parameters())

def test_small_extractor_has_no_output_pool_and_older_files_load(tmp_path):
    disc = Discriminator(8, 1, label_dim=4, extractor='small')
    assert not any(k.startswith('classifier.out.') for k in disc.state_dict())
    # Files written before held that unused pool (after all the encoder's other layers): they load, the same function.
    from training.network_io import save_safe
    old = with_output_pool(small_discriminator(res=8, channels=1, label_dim=4))
    save_safe(old, tmp_path / 'old.safetensors')
    loaded = guidance.load_discriminator(str(tmp_path / 'old.safetensors'), verbose=False)
    x, t, y = torch.randn([3, 1, 8, 8]), torch.tensor([0.1, 0.5, 0.9]), torch.tensor([0, 1, 3])
    assert torch.equal(loaded(x, t, y), old(x, t, y))

@pytest.fixture(scope='module')
def gen_files(tmp_path_factory):
    from training.network_io import save_safe
    from training.testdata import load_golden_network
    d = tmp_path_factory.mktemp('dg')
    files = dict(net=str(d / 'cond.safetensors'), uncond=str(d / 'uncond.safetensors'))
    save_safe(load_golden_network('networks/ddpmpp_edm_cond.npz', 'networks/ddpmpp_edm_cond.json'), files['net'])
    save_safe(load_golden_network('networks/ddpmpp_edm_uncond.npz', 'networks/ddpmpp_edm_uncond.json'), files['uncond'])
    for name, disc in [('disc', small_discriminator()), ('disc8', small_discriminator(res=8)),
                       ('disc_1ch', small_discriminator(channels=1)), ('disc4', small_discriminator(label_dim=4))]:
        files[name] = str(d / f'{name}.safetensors')
        save_safe(disc, files[name])
    return files

def run_generate(args):
    import subprocess, sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, 'generate.py', *args], cwd=root, text=True, capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout

def read_pngs(outdir):
    import PIL.Image
    return {name: np.array(PIL.Image.open(os.path.join(outdir, name))) for name in sorted(os.listdir(outdir)) if name.endswith('.png')}

@pytest.mark.slow
def test_generate_with_dg_is_seed_exact_and_writes_labels(gen_files, tmp_path):
    from sampling.images import to_uint8
    from training.network_io import load_network
    args = ['--network', gen_files['net'], '--dg', gen_files['disc'], '--dg-weight=3', '--dg-boosting', '--seeds=0-4', '--steps=4']
    out = run_generate(args + ['--outdir', str(tmp_path / 'b1'), '--batch=1'])
    assert 'Discriminator guidance: weight 3 (2nd order 0), VP times 0.01-1, boosting on' in out
    run_generate(args + ['--outdir', str(tmp_path / 'b3'), '--batch=3'])
    b1, b3 = read_pngs(tmp_path / 'b1'), read_pngs(tmp_path / 'b3')
    assert sorted(b1) == [f'{s:06d}.png' for s in range(5)]

    net = load_network(gen_files['net'], verbose=False)
    latents, labels, rnd = latents_for_seeds(net, list(range(5)))
    dg = DiscriminatorGuidance(guidance.load_discriminator(gen_files['disc'], verbose=False))
    with torch.no_grad():
        kwargs = dict(randn_like=rnd.randn_like, num_steps=4)
        expected = to_uint8(guided_edm_sampler(MinBatchNet(net), latents, labels, guidance=dg, dg_weight=3, dg_boosting=True, **kwargs))
        plain = to_uint8(edm_sampler(net, latents, labels, num_steps=4))
    for s in range(5):
        assert np.array_equal(b1[f'{s:06d}.png'], expected[s]) and np.array_equal(b3[f'{s:06d}.png'], expected[s]), s
    assert np.abs(expected.astype(int) - plain.astype(int)).max() > 10 # guidance changed the images

    # The class of each image travels in dataset.json (EDM's dataset format), merged over runs.
    labels_json = json.load(open(tmp_path / 'b1' / 'dataset.json'))['labels']
    assert labels_json == [[f'{s:06d}.png', int(labels[s].argmax())] for s in range(5)]
    assert json.load(open(tmp_path / 'b3' / 'dataset.json'))['labels'] == labels_json # each image's own class in a batch
    assert len({label for _, label in labels_json}) > 1 # the seeds draw different classes, so a mix-up shows
    run_generate(['--network', gen_files['net'], '--outdir', str(tmp_path / 'b1'), '--seeds=7', '--steps=2', '--class=3'])
    assert json.load(open(tmp_path / 'b1' / 'dataset.json'))['labels'][-1] == ['000007.png', 3]
    run_generate(['--network', gen_files['uncond'], '--outdir', str(tmp_path / 'u'), '--seeds=0', '--steps=2'])
    assert not os.path.exists(tmp_path / 'u' / 'dataset.json') # unconditional: nothing to record

@pytest.mark.slow
def test_generate_with_dg_published_checkpoints(tmp_path):
    # DG's .pt pair (state dicts, as DG publishes them) on a 32x32 RGB network with 10 classes.
    from training.network_io import save_safe
    net, _ = golden_edm_net()
    save_safe(net, tmp_path / 'net32.safetensors')
    torch.save(fill_params(adm_classifier(32), 1).state_dict(), tmp_path / '32x32_classifier.pt')
    torch.save(fill_params(discriminator_head(cond=True), 3).state_dict(), tmp_path / 'discriminator_250.pt')
    out = run_generate(['--network', str(tmp_path / 'net32.safetensors'), '--outdir', str(tmp_path / 'out'), '--seeds=0-1', '--steps=2',
                        '--dg-classifier', str(tmp_path / '32x32_classifier.pt'), '--dg-head', str(tmp_path / 'discriminator_250.pt'), '--dg-weight=1'])
    assert 'Discriminator guidance: weight 1' in out and len(read_pngs(tmp_path / 'out')) == 2

DG_BAD_INPUTS = {
    'resolution':      (['--network={net}', '--dg={disc8}'], '8x8 images with 3 channels, but the network makes 16x16'),
    'channels':        (['--network={net}', '--dg={disc_1ch}'], '1 channel, but'),
    'classes':         (['--network={net}', '--dg={disc4}'], 'trained on 4 classes, but the network has 10'),
    'cond head':       (['--network={uncond}', '--dg={disc}'], 'network is unconditional'),
    'not a disc':      (['--network={net}', '--dg={uncond}'], 'not a discriminator'),
    'missing disc':    (['--network={net}', '--dg={tmp}/nope.safetensors'], 'nope.safetensors'),
    'weight alone':    (['--network={net}', '--dg-weight=2'], 'needs a discriminator'),
    'both kinds':      (['--network={net}', '--dg={disc}', '--dg-head=x.pt'], 'not both'),
    'head alone':      (['--network={net}', '--dg-classifier=x.pt'], '--dg-head'),
    'ablation':        (['--network={net}', '--dg={disc}', '--solver=euler'], "EDM's sampler"),
    'window':          (['--network={net}', '--dg={disc}', '--dg-time-min=0.5', '--dg-time-max=0.2'], '--dg-time-min'),
}

@pytest.mark.parametrize('case', list(DG_BAD_INPUTS))
def test_generate_dg_errors(case, gen_files, tmp_path):
    from click.testing import CliRunner
    import generate
    args, expected = DG_BAD_INPUTS[case]
    args = [a.format(tmp=tmp_path, **gen_files) for a in args] + ['--outdir', str(tmp_path / 'out'), '--seeds=0', '--steps=2']
    try:
        result = CliRunner().invoke(generate.main, args)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    lines = result.stderr.strip().splitlines()
    assert result.exit_code != 0 and 'Traceback' not in result.stderr, result.stderr
    assert lines and lines[-1].startswith('Error:') and expected in lines[-1], result.stderr
    assert not (tmp_path / 'out').exists()
