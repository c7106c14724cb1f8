"""Few-step solvers (sampling/solvers.py): diff-sampler's golden outputs, NFE, noise levels, AFS,
validation, --sigmas values, DG on every evaluation."""

import json
import os
import types

import numpy as np
import pytest
import torch

from sampling import schedules, solvers
from sampling.denoisers import NFECounter, trace_sampler
from sampling.seeds import latents_for_seeds
from tests.helpers import SOLVERS_DATA as DATA, SOLVERS_README as README, GaussianDenoiser, golden_network

GOLDEN = os.path.join(os.path.dirname(__file__), 'golden', 'solvers')

# diff-sampler's names of solvers and schedules -> ours.
SOLVER_NAMES = {'euler_sampler': 'euler', 'ipndm_sampler': 'ipndm', 'ipndm_v_sampler': 'ipndm-v', 'dpm_pp_sampler': 'dpmpp',
                'unipc_sampler': 'unipc', 'deis_sampler': 'deis', 'dpm_2_sampler': 'dpm2'}
DISC_NAMES = {'polynomial': 'edm', 'logsnr': 'logsnr', 'time_uniform': 'time-uniform'}

def golden_sigmas(kwargs):
    return schedules.get_sigmas(DISC_NAMES[kwargs['schedule_type']], kwargs['num_steps'], kwargs['sigma_min'],
                              kwargs['sigma_max'], kwargs.get('schedule_rho', 7))

#----------------------------------------------------------------------------
# Golden outputs of diff-sampler (gits-main) on the small golden networks.

@pytest.mark.parametrize('name', sorted(DATA.files))
def test_schedules_match_golden(name):
    if not name.startswith('schedule/'):
        return
    schedule, rho, num_steps = name.split('/')[1].rsplit('_', 2)
    sigmas = schedules.get_sigmas(DISC_NAMES[schedule], int(num_steps[1:]), 0.002, 80, float(rho[len('rho'):]))
    assert sigmas.dtype == torch.float64
    np.testing.assert_allclose(sigmas.numpy(), DATA[name], rtol=1e-6, atol=0)

@pytest.mark.parametrize('case', sorted(README['solvers']))
def test_solver_matches_golden(case, one_thread):
    cfg = README['solvers'][case]
    kwargs = cfg['kwargs']
    net = golden_network(cfg['network'])
    sigmas = golden_sigmas(kwargs)
    np.testing.assert_allclose(sigmas.numpy(), DATA[f'{case}/t_steps'], rtol=1e-6, atol=0)
    latents, class_labels, _ = latents_for_seeds(net, README['seeds'])
    if cfg['class_labels'] is not None:
        assert class_labels.argmax(1).tolist() == cfg['class_labels']
    counter = NFECounter(net)
    solver = SOLVER_NAMES[cfg['solver']]
    with torch.no_grad():
        images = solvers.sample(counter, latents, class_labels, solver=solver, sigmas=sigmas, order=kwargs.get('max_order'),
                                afs=kwargs.get('afs', False), variant=kwargs.get('variant'))
    assert counter.nfe == cfg['nfe'] == solvers.nfe(solver, len(sigmas), afs=kwargs.get('afs', False))
    error = np.abs(images.numpy() - DATA[f'{case}/images']).max()
    assert error <= 2e-4 * cfg['max_abs_images'], f'{case}: max abs difference {error:.3g}'

@pytest.mark.parametrize('case', ['deis3_poly7_n8', 'deis3_logsnr_n6'])
def test_deis_coefficients_match_golden(case):
    kwargs = README['solvers'][case]['kwargs']
    reference = DATA[f'{case}/coeff_list']
    coefficients = solvers.deis_coefficients(golden_sigmas(kwargs), kwargs['max_order'])
    assert len(coefficients) == len(reference)
    for row, ref_row in zip(coefficients, reference):
        ref_row = ref_row[~np.isnan(ref_row)]
        assert len(row) == len(ref_row)
        # The reference sums 10,000 float32 terms: ~1e-6 relative, 3.5e-6 on the last step.
        np.testing.assert_allclose(row, ref_row, rtol=1e-5, atol=0)

#----------------------------------------------------------------------------
# AFS, NFE, callback.

@pytest.mark.parametrize('solver', list(solvers.SOLVERS))
def test_afs_saves_the_first_evaluation(solver):
    """With afs the first slope is x / sqrt(1 + sigma^2) and the network is called once less,
    never at sigma_max (unipc evaluates once per level but the last, the others once per step)."""
    net = GaussianDenoiser()
    sigmas = schedules.edm_sigmas(6)
    latents = torch.randn([2, 3, 4, 4], generator=torch.Generator().manual_seed(1))
    steps = []
    plain, with_afs = NFECounter(net), NFECounter(net)
    solvers.sample(plain, latents, solver=solver, sigmas=sigmas)
    solvers.sample(with_afs, latents, solver=solver, sigmas=sigmas, afs=True, callback=steps.append)
    assert with_afs.nfe == plain.nfe - 1 == solvers.nfe(solver, len(sigmas), afs=True)
    assert float(sigmas[0]) in plain.sigmas and float(sigmas[0]) not in with_afs.sigmas
    x = latents.double() * sigmas[0]
    assert torch.equal(steps[0].x, x)
    torch.testing.assert_close(steps[0].denoised, x - sigmas[0] * x / (1 + sigmas[0] ** 2).sqrt(), rtol=1e-10, atol=0)

def test_callback_reports_every_step():
    net = GaussianDenoiser()
    sigmas = schedules.logsnr_sigmas(5)
    latents = torch.randn([2, 3, 4, 4], generator=torch.Generator().manual_seed(2))
    steps = []
    result = solvers.sample(net, latents, solver='ipndm', sigmas=sigmas, order=2, callback=steps.append)
    assert [s.i for s in steps] == [0, 1, 2, 3]
    assert [float(s.sigma) for s in steps] == sigmas[:-1].tolist() and [float(s.sigma_next) for s in steps] == sigmas[1:].tolist()
    assert all(torch.equal(a.x_next, b.x) for a, b in zip(steps, steps[1:])) and torch.equal(steps[-1].x_next, result)
    torch.testing.assert_close(steps[1].denoised, net(steps[1].x, sigmas[1]))

def test_trace_sampler_gives_nfe_and_levels():
    """generate.py's dry run (sampling.trace_sampler) works on sample(): NFE and levels, no evaluation."""
    net = GaussianDenoiser()
    sigmas = schedules.edm_sigmas(11, rho=7)
    nfe, called = trace_sampler(net, solvers.sample, solver='ipndm', sigmas=sigmas)
    assert nfe == 10 and called == sigmas[:-1].tolist()
    nfe, called = trace_sampler(net, solvers.sample, solver='unipc', sigmas=sigmas, afs=True)
    assert nfe == 9 and called == sigmas[1:-1].tolist()
    nfe, called = trace_sampler(net, solvers.sample, solver='dpm2', sigmas=sigmas[:3])
    assert nfe == 4 and called == pytest.approx([80, (80 * sigmas[1].item()) ** 0.5, sigmas[1].item(), (sigmas[1] * sigmas[2]).sqrt().item()])

@pytest.mark.parametrize('solver', list(solvers.SOLVERS))
def test_solvers_approach_the_exact_ode_solution(solver):
    """On Gaussian data the ODE has a closed form; with 16 steps every solver gets within 5% of it, and
    several times closer than Euler (15% off)."""
    net = GaussianDenoiser()
    sigmas = schedules.logsnr_sigmas(17)
    latents = torch.randn([2, 3, 4, 4], dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    exact = latents * 80 * np.sqrt(net.sigma_data ** 2 + 0.002 ** 2) / np.sqrt(net.sigma_data ** 2 + 80 ** 2)
    error = lambda name: (solvers.sample(net, latents, solver=name, sigmas=sigmas) - exact).abs().max().item() / exact.abs().max().item()
    assert error(solver) < 0.2
    if solver != 'euler':
        assert error(solver) < 0.05 and error(solver) < 0.25 * error('euler')

#----------------------------------------------------------------------------
# Guidance: DG's correction reaches every evaluation's slope.

def test_dg_correction_on_every_evaluation():
    class ConstantGuidance:
        calls = 0
        def correction(self, x, sigma, class_labels=None):
            self.calls += 1
            return torch.full_like(x, 0.25, dtype=torch.float32), torch.zeros(x.shape[0])
    net = GaussianDenoiser()
    sigmas = schedules.edm_sigmas(4)
    latents = torch.randn([2, 3, 4, 4], generator=torch.Generator().manual_seed(4))
    for solver in ['euler', 'dpmpp']:
        guidance = ConstantGuidance()
        plain, guided = [], []
        solvers.sample(net, latents, solver=solver, sigmas=sigmas, callback=plain.append)
        solvers.sample(net, latents, solver=solver, sigmas=sigmas, guidance=guidance, dg_weight=2.0, callback=guided.append)
        assert guidance.calls == 3
        # First step: same x, slope + weight * correction / sigma, as sampling.dg_slope adds it.
        torch.testing.assert_close(guided[0].denoised, plain[0].denoised - 2.0 * 0.25)
        step = sigmas[1] - sigmas[0]
        if solver == 'euler':
            torch.testing.assert_close(guided[0].x_next, plain[0].x_next + step * 2.0 * 0.25 / sigmas[0])
    guidance = ConstantGuidance()
    solvers.sample(net, latents, solver='ipndm', sigmas=sigmas, order=3, guidance=guidance, dg_weight=0)
    assert guidance.calls == 0

#----------------------------------------------------------------------------
# Bad input: one clear ValueError each.

@pytest.mark.parametrize('kwargs, message', [
    (dict(solver='rk4'), 'unknown solver'),
    (dict(solver='ipndm', order=5), 'orders 1 to 4'),
    (dict(solver='dpmpp', order=4), 'orders 1 to 3'),
    (dict(solver='unipc', order=0), 'orders 1 to 3'),
    (dict(solver='euler', order=2), 'fixed order 1'),
    (dict(solver='dpm2', order=3), 'fixed order 2'),
    (dict(solver='ipndm', variant='bh1'), 'UniPC'),
    (dict(solver='unipc', variant='bh3'), 'unknown UniPC variant'),
    (dict(solver='ipndm', sigmas=[80, 10, 1, 0.002]), 'needs at least 5 noise levels, got 4'),
    (dict(solver='deis', order=3, sigmas=[80, 1, 0.002]), 'needs at least 4 noise levels'),
    (dict(solver='euler', sigmas=[80, 0.002], afs=True), 'AFS'),
    (dict(solver='euler', sigmas=[80, 10, 10, 0.002]), 'strictly decreasing'),
    (dict(solver='euler', sigmas=[0.002, 80]), 'strictly decreasing'),
    (dict(solver='euler', sigmas=[80, 1, 0]), 'positive'),
    (dict(solver='euler', sigmas=[80, float('nan'), 1]), 'positive'),
    (dict(solver='euler', sigmas=[80]), 'at least 2'),
])
def test_bad_input(kwargs, message):
    kwargs = dict(dict(sigmas=schedules.edm_sigmas(6)), **kwargs)
    with pytest.raises(ValueError, match=message):
        solvers.sample(GaussianDenoiser(), torch.zeros([1, 3, 4, 4]), **kwargs)

def test_enough_levels_for_the_order_are_accepted():
    """K + 1 levels suffice for order K; unipc then never corrects at the last level."""
    for solver in solvers.VARIABLE_ORDER:
        order = solvers.DEFAULT_ORDER[solver]
        counter = NFECounter(GaussianDenoiser())
        solvers.sample(counter, torch.zeros([1, 3, 4, 4]), solver=solver, sigmas=schedules.edm_sigmas(order + 1))
        assert counter.nfe == order

def test_get_sigmas_rejects_bad_names_and_counts():
    with pytest.raises(ValueError, match='unknown discretization'):
        schedules.get_sigmas('karras', 10)
    with pytest.raises(ValueError, match='at least 2'):
        schedules.get_sigmas('edm', 1)

def test_read_sigmas(tmp_path):
    assert schedules.read_sigmas('80,10.9,0.002') == [80, 10.9, 0.002]
    listed, searched = tmp_path / 'list.json', tmp_path / 'search.json'
    listed.write_text('[80, 1, 0.002]')
    searched.write_text(json.dumps({'sigmas': [80, 2, 0.002], 'metric': 'dev'}))
    assert schedules.read_sigmas(str(listed)) == [80, 1, 0.002]
    assert schedules.read_sigmas(str(searched)) == [80, 2, 0.002]
    with pytest.raises(ValueError, match='cannot read'):
        schedules.read_sigmas('80,ten,1')
    with pytest.raises(ValueError, match='cannot read noise levels from'):
        schedules.read_sigmas(str(tmp_path / 'missing.json'))
    (tmp_path / 'other.json').write_text('{"levels": [1]}')
    with pytest.raises(ValueError, match='no list of noise levels'):
        schedules.read_sigmas(str(tmp_path / 'other.json'))

#----------------------------------------------------------------------------
