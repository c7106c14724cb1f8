"""Samplers: golden outputs of EDM's generate.py, seed-exact latents, NFE, callback, convergence."""

import json
import os
import types
import numpy as np
import pytest
import torch
from tests.helpers import assert_golden
from sampling import edm
from sampling.denoisers import MinBatchNet, NFECounter, trace_sampler
from sampling.edm import ablation_sampler, edm_sampler
from sampling.schedules import edm_time_steps
from sampling.seeds import StackedRandomGenerator, latents_for_seeds
from training.testdata import load_golden_network
from tests.helpers import GaussianDenoiser

GOLDEN = os.path.join(os.path.dirname(__file__), 'golden')
SAMPLER_README = json.load(open(os.path.join(GOLDEN, 'sampler', 'README.json')))
CONFIGS = SAMPLER_README['configs']
# torch.randn's Box-Muller uses the kernels' own log and cos: latents differ in the last bits between
# kernel sets (at most 1.4e-6 seen, no vectorisation against AVX2), so a seed's latents are EDM's
# bit for bit under the golden kernels only (helpers.PINNED_KERNELS) and within this elsewhere.
LATENTS_ATOL = 1e-5

def stub_net(label_dim=10):
    return types.SimpleNamespace(img_channels=3, img_resolution=16, label_dim=label_dim)

#----------------------------------------------------------------------------

@pytest.mark.golden
def test_latents_and_labels_match_edm_generate():
    ref = np.load(os.path.join(GOLDEN, 'sampler', 'inputs.npz'))
    latents, labels, _ = latents_for_seeds(stub_net(), [0, 1, 2, 3])
    assert latents.dtype == torch.float32
    assert_golden(latents, ref['latents'], atol=LATENTS_ATOL, what='latents')
    np.testing.assert_array_equal(labels.numpy(), ref['class_labels'])
    assert labels.argmax(1).tolist() == CONFIGS['edm_steps18_rho7']['class_labels']
    uncond_latents, uncond_labels, _ = latents_for_seeds(stub_net(label_dim=0), [0, 1, 2, 3])
    assert uncond_labels is None
    assert_golden(uncond_latents, ref['latents'], atol=LATENTS_ATOL, what='latents')

def test_seed_gives_same_latents_in_any_batch():
    all4, labels4, _ = latents_for_seeds(stub_net(), [0, 1, 2, 3])
    for i, seed in enumerate([0, 1, 2, 3]):
        one, label, _ = latents_for_seeds(stub_net(), [seed])
        assert torch.equal(one[0], all4[i]) and torch.equal(label[0], labels4[i])
    shuffled, _, _ = latents_for_seeds(stub_net(), [3, 1])
    assert torch.equal(shuffled, all4[[3, 1]])

@pytest.mark.golden
def test_forced_class():
    ref = np.load(os.path.join(GOLDEN, 'sampler', 'inputs.npz'))
    latents, labels, rnd = latents_for_seeds(stub_net(), [0, 1, 2, 3], class_idx=4)
    assert_golden(latents, ref['latents'], atol=LATENTS_ATOL, what='latents')
    assert labels.argmax(1).tolist() == [4] * 4 and labels.sum().item() == 4
    # The label draw still happened, so the noise stream after it is the same as without --class.
    _, _, rnd_free = latents_for_seeds(stub_net(), [0, 1, 2, 3])
    assert torch.equal(rnd.randn([4, 5]), rnd_free.randn([4, 5]))
    with pytest.raises(ValueError, match='out of range'):
        latents_for_seeds(stub_net(), [0], class_idx=10)
    with pytest.raises(ValueError, match='unconditional'):
        latents_for_seeds(stub_net(label_dim=0), [0], class_idx=0)

def test_stacked_generator_is_per_seed():
    rnd = StackedRandomGenerator('cpu', [5, 6])
    x = rnd.randn([2, 3])
    assert torch.equal(x[1], torch.randn([3], generator=torch.Generator().manual_seed(6)))
    y = rnd.randn_like(torch.zeros([2, 4], dtype=torch.float64))
    assert y.dtype == torch.float64 and y.shape == (2, 4)
    assert rnd.randint(10, size=[2, 7]).shape == (2, 7)

#----------------------------------------------------------------------------
# Golden outputs of EDM's generate.py on the small golden networks.

@pytest.mark.golden
@pytest.mark.parametrize('config', list(CONFIGS))
def test_sampler_matches_golden(config):
    cfg = CONFIGS[config]
    ref = np.load(os.path.join(GOLDEN, 'sampler', cfg['file']))
    net = load_golden_network(cfg['network'], cfg['network_json'])
    latents, class_labels, rnd = latents_for_seeds(net, [0, 1, 2, 3])
    assert_golden(latents, ref['latents'], atol=LATENTS_ATOL, what='latents')
    if 'class_labels' in ref.files:
        np.testing.assert_array_equal(class_labels.numpy(), ref['class_labels'])
    else:
        assert class_labels is None

    counter = NFECounter(net)
    sampler_fn = getattr(edm, cfg['sampler'])
    with torch.no_grad():
        images = sampler_fn(counter, latents, class_labels, randn_like=rnd.randn_like, **cfg['kwargs'])

    assert images.dtype == torch.float64
    assert counter.nfe == cfg['nfe'] == len(ref['call_sigmas'])
    np.testing.assert_allclose(counter.sigmas, ref['call_sigmas'], rtol=1e-12, atol=0)
    atol = cfg['suggested_atol_images']
    assert np.abs(images.numpy() - ref['images']).max() <= atol

    # uint8 as generate.py saves them: exact, except where the reference value sits within atol of a
    # rounding boundary (the conversion truncates, so boundaries are the integers of images*127.5+128).
    images_uint8 = (images * 127.5 + 128).clip(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    scaled = np.transpose(ref['images'] * 127.5 + 128, (0, 2, 3, 1))
    near_boundary = np.abs(scaled - np.round(scaled)) <= atol * 127.5
    diff = np.abs(images_uint8.astype(int) - ref['images_uint8'].astype(int))
    assert diff[~near_boundary].max(initial=0) == 0
    assert diff.max() <= 1

    # The dry run predicts the same evaluations without running the network.
    nfe, sigmas = trace_sampler(net, sampler_fn, **cfg['kwargs'])
    assert nfe == cfg['nfe']
    np.testing.assert_allclose(sigmas, ref['call_sigmas'], rtol=1e-12, atol=0)

#----------------------------------------------------------------------------
# Properties that hold for any network.

def test_time_steps():
    t = edm_time_steps(18, 0.002, 80, 7)
    assert t.dtype == torch.float64 and len(t) == 19 and t[-1] == 0
    assert abs(t[0].item() - 80) < 1e-12 and abs(t[-2].item() - 0.002) < 1e-15
    assert (t[1:] < t[:-1]).all()
    # Uniform in sigma^(1/rho).
    spacing = t[:-1] ** (1 / 7)
    np.testing.assert_allclose(np.diff(spacing.numpy()), np.diff(spacing.numpy())[0], rtol=1e-9)
    with pytest.raises(ValueError, match='at least 2'):
        edm_time_steps(1)

@pytest.mark.parametrize('num_steps', [2, 5, 18])
def test_nfe_and_callback(num_steps):
    net = GaussianDenoiser()
    latents = torch.randn([2, 3, 4, 4], generator=torch.Generator().manual_seed(0))
    steps = []
    counter = NFECounter(net)
    out = edm_sampler(counter, latents, num_steps=num_steps, callback=steps.append)
    assert counter.nfe == 2 * num_steps - 1
    assert trace_sampler(net, edm_sampler, num_steps=num_steps)[0] == 2 * num_steps - 1
    assert [s.i for s in steps] == list(range(num_steps))
    assert torch.equal(steps[-1].x_next, out) and steps[-1].t_next == 0
    assert steps[-1].d_prime is None and all(s.d_prime is not None for s in steps[:-1])
    for prev, cur in zip(steps[:-1], steps[1:]):
        assert torch.equal(prev.x_next, cur.x_cur) and prev.t_next == cur.t_cur
    # The callback sees the denoiser output the slope was built from.
    s = steps[0]
    assert torch.allclose(s.d_cur, (s.x_hat - s.denoised) / s.t_hat)
    assert torch.allclose(s.denoised, net(s.x_hat, s.t_hat))

    for solver, nfe in [('heun', 2 * num_steps - 1), ('euler', num_steps)]:
        counter = NFECounter(net)
        ablation_sampler(counter, latents, num_steps=num_steps, solver=solver, discretization='vp', schedule='vp', scaling='vp')
        assert counter.nfe == nfe

def test_ablation_edm_linear_none_equals_edm_sampler():
    latents = torch.randn([3, 3, 4, 4], generator=torch.Generator().manual_seed(1))
    for kwargs in [dict(), dict(S_churn=40, S_min=0.05, S_max=50, S_noise=1.003)]:
        outs = [fn(GaussianDenoiser(), latents, num_steps=12, randn_like=StackedRandomGenerator('cpu', [0, 1, 2]).randn_like, **kwargs)
                for fn in (edm_sampler, ablation_sampler)]
        assert (outs[0] - outs[1]).abs().max() <= 1e-13

def test_stochastic_sampler_is_per_seed():
    net = GaussianDenoiser()
    kwargs = dict(num_steps=6, S_churn=40, S_min=0.05, S_max=50, S_noise=1.003)
    rnd = StackedRandomGenerator('cpu', [0, 1, 2])
    batch = edm_sampler(net, rnd.randn([3, 3, 4, 4]), randn_like=rnd.randn_like, **kwargs)
    rnd1 = StackedRandomGenerator('cpu', [1])
    alone = edm_sampler(net, rnd1.randn([1, 3, 4, 4]), randn_like=rnd1.randn_like, **kwargs)
    assert torch.equal(batch[1], alone[0])
    deterministic = edm_sampler(net, StackedRandomGenerator('cpu', [1]).randn([1, 3, 4, 4]), num_steps=6)
    assert (deterministic - alone).abs().max() > 1e-3 # churn changed the result

@pytest.mark.parametrize('discretization', ['vp', 've', 'iddpm', 'edm'])
@pytest.mark.parametrize('schedule', ['vp', 've', 'linear'])
@pytest.mark.parametrize('scaling', ['vp', 'none'])
def test_ablation_sampler_converges_to_exact_ode_solution(discretization, schedule, scaling):
    # Every combination solves the same ODE, so with many steps all reach the closed-form answer.
    net = GaussianDenoiser()
    latents = torch.randn([2, 3, 4, 4], dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    sd2 = net.sigma_data ** 2
    errors = {}
    for solver in ['euler', 'heun']:
        for num_steps in [32, 256]:
            counter = NFECounter(net)
            out = ablation_sampler(counter, latents, num_steps=num_steps, sigma_min=0.002, sigma_max=80,
                                   solver=solver, discretization=discretization, schedule=schedule, scaling=scaling)
            assert torch.isfinite(out).all()
            # Exact flow between the first and last noise level (iDDPM's lie on its grid), then
            # the sampler's final Euler step to 0.
            first, last = counter.sigmas[0], counter.sigmas[-1]
            exact = latents * first * np.sqrt((sd2 + last ** 2) / (sd2 + first ** 2)) * sd2 / (sd2 + last ** 2)
            errors[solver, num_steps] = ((out - exact).abs().max() / exact.abs().max()).item()
    # 8x the steps: Heun (2nd order) gains about 64x, Euler (1st order) about 8x.
    assert errors['heun', 256] < 0.1 and errors['heun', 32] / errors['heun', 256] > 30
    assert errors['euler', 32] / errors['euler', 256] > 4

def test_ablation_rejects_bad_options():
    net, latents = GaussianDenoiser(), torch.zeros([1, 1, 2, 2])
    for kwargs, message in [(dict(solver='rk4'), 'solver'), (dict(discretization='cosine'), 'discretization'),
                            (dict(schedule='cosine'), 'schedule'), (dict(scaling='ve'), 'scaling'),
                            (dict(alpha=0), 'alpha'), (dict(num_steps=1), 'at least 2')]:
        with pytest.raises(ValueError, match=message):
            ablation_sampler(net, latents, **kwargs)

def test_min_batch_net_pads_and_keeps_results_batch_independent():
    net = load_golden_network('networks/ddpmpp_edm_cond.npz', 'networks/ddpmpp_edm_cond.json')
    padded = MinBatchNet(net, min_batch=4)
    assert padded.label_dim == 10 and padded.sigma_max == net.sigma_max # attributes pass through
    latents, labels, _ = latents_for_seeds(net, list(range(6)))
    sigma = torch.tensor(2.5, dtype=torch.float64)
    with torch.no_grad():
        whole = net(latents, sigma, labels)
        for n in [1, 2, 3]:
            out = padded(latents[:n], sigma, labels[:n])
            assert out.shape[0] == n
            # Same kernels as in the batch of six, so the very same numbers.
            assert torch.equal(out, whole[:n]), n
        per_sample = padded(latents[:2], torch.full([2], 2.5), labels[:2], augment_labels=torch.zeros([2, 9]))
        assert torch.equal(per_sample, whole[:2])

@pytest.mark.parametrize('sampler_fn', [edm_sampler, ablation_sampler])
def test_noise_draws(sampler_fn):
    # With churn, one draw per step even where no noise is added (EDM's stream); without, none.
    calls = []
    def randn_like(x):
        calls.append(x.shape)
        return torch.randn_like(x)
    latents = torch.randn([2, 3, 4, 4], generator=torch.Generator().manual_seed(3))
    sampler_fn(GaussianDenoiser(), latents, randn_like=randn_like, num_steps=6, S_churn=10, S_min=1, S_max=10)
    assert len(calls) == 6 and calls[0] == (2, 3, 4, 4)
    calls.clear()
    sampler_fn(GaussianDenoiser(), latents, randn_like=randn_like, num_steps=6)
    assert calls == []

def test_old_module_paths_keep_their_names():
    # training.sampling was the documented home of EDM's samplers before sampling/ (and DG's classes
    # stay in training.guidance, the module that DG files name); user code that imports them keeps working.
    import training.guidance, training.sampling
    from sampling import denoisers, guidance, schedules, seeds
    assert training.sampling.ablation_sampler is edm.ablation_sampler and training.sampling.SamplerStep is denoisers.Step
    assert training.sampling.latents_for_seeds is seeds.latents_for_seeds and training.sampling.edm_time_steps is schedules.edm_time_steps
    assert training.guidance.DiscriminatorGuidance is guidance.DiscriminatorGuidance
    # The old edm_sampler is EDM's without guidance, and DG's EDM-G++ with its arguments.
    net, latents = GaussianDenoiser(), torch.randn([2, 1, 4, 4], generator=torch.Generator().manual_seed(0))
    assert torch.equal(training.sampling.edm_sampler(net, latents, num_steps=3), edm.edm_sampler(net, latents, num_steps=3))
    class Constant: # a correction of 0.1 everywhere, log ratio 1 ('real')
        def correction(self, x, sigma, class_labels=None):
            return torch.full_like(x, 0.1, dtype=torch.float32), torch.ones(x.shape[0])
    old = training.sampling.edm_sampler(net, latents, num_steps=3, guidance=Constant(), dg_weight=1.5)
    assert torch.equal(old, guidance.guided_edm_sampler(net, latents, num_steps=3, guidance=Constant(), dg_weight=1.5))
    assert not torch.equal(old, edm.edm_sampler(net, latents, num_steps=3))
