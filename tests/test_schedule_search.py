"""tools/schedule_search.py: GITS's dynamic programme and whole search against diff-sampler's golden
results, the solver-error descent, the command line and its JSON for generate.py --sigmas."""

import itertools
import json
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from tools import schedule_search
from training import solvers
from training.network_io import save_safe
from tests.test_solvers import DATA, README, golden_network

pytestmark = pytest.mark.usefixtures('one_thread')
UNCOND = 'networks/ddpmpp_edm_uncond.npz'

@pytest.mark.parametrize('case', sorted(README['dp_cases']))
def test_dp_matches_golden(case):
    cfg = README['dp_cases'][case]
    cost = DATA[f'{case}/cost']
    assert len(cost) == cfg['num_steps_tea']
    assert schedule_search.best_path(cost, cfg['num_steps'], cfg['coeff']) == cfg['dp_list']

def test_dp_finds_the_cheapest_path():
    """Against every path through 9 levels, on random costs."""
    rng = np.random.default_rng(0)
    L = 9
    for num_steps, coeff in [(3, 1.15), (4, 0.9), (5, 1.0), (9, 1.15)]:
        cost = np.triu(rng.random((L, L)), 1)
        total = lambda p: sum(coeff ** k * cost[a, b] for k, (a, b) in enumerate(zip(p[:-1], p[1:])))
        best = min(total((0, *inner, L - 1)) for inner in itertools.combinations(range(1, L - 1), num_steps - 2))
        path = schedule_search.best_path(cost, num_steps, coeff)
        assert len(path) == num_steps and path[0] == 0 and path[-1] == L - 1 and sorted(set(path)) == path
        assert total(path) == pytest.approx(best, rel=1e-12)
    with pytest.raises(ValueError, match='cannot pick 10 of 9'):
        schedule_search.best_path(cost, 10, 1.15)

@pytest.fixture(scope='module')
def golden_teacher():
    net = golden_network(UNCOND)
    sigmas = solvers.get_sigmas('edm', 61, 0.002, 80, 7)
    latents = torch.from_numpy(DATA['gits/warmup_latents'])
    with torch.no_grad():
        states, slopes = schedule_search.teacher_path(net, latents, None, sigmas)
    return states, slopes, sigmas

@pytest.mark.parametrize('case', sorted(README['gits_cases']))
def test_gits_search_matches_golden(case, golden_teacher):
    cfg = README['gits_cases'][case]
    states, slopes, sigmas = golden_teacher
    assert states.shape[0] == cfg['num_steps_tea'] == len(sigmas)
    cost = (schedule_search.jump_costs(states, slopes, sigmas, cfg['metric']) / states.shape[1]).numpy()
    reference = DATA[f'{case}/cost']
    np.testing.assert_allclose(cost, reference, rtol=1e-4, atol=1e-4 * np.abs(reference).max())
    path = schedule_search.best_path(cost, cfg['num_steps'], cfg['coeff'])
    assert path == cfg['dp_list']
    np.testing.assert_allclose(sigmas[path].numpy(), DATA[f'{case}/t_steps'], rtol=1e-6)

def test_teacher_path_holds_the_teachers_states_and_slopes():
    net = golden_network(UNCOND)
    sigmas = solvers.edm_sigmas(6)
    latents = torch.from_numpy(DATA['gits/warmup_latents'][:2])
    with torch.no_grad():
        states, slopes = schedule_search.teacher_path(net, latents, None, sigmas)
        final = schedule_search.teacher(net, latents, None, sigmas)
        x0 = latents.double() * sigmas[0]
        slope0 = (x0 - net(x0, sigmas[0]).double()) / sigmas[0]
    assert states.shape == (6, 2, 3 * 16 * 16) and slopes.shape == (5, 2, 3 * 16 * 16)
    assert torch.equal(states[0], x0.flatten(1)) and torch.equal(states[-1], final.flatten(1))
    torch.testing.assert_close(slopes[0], slope0.flatten(1))

def test_solver_metric_lowers_the_solvers_error():
    """The descent ends below the error of the fixed levels it started from (and never above)."""
    net = golden_network(UNCOND)
    draws = [(torch.from_numpy(DATA['gits/warmup_latents'][:4]), None)]
    with torch.no_grad():
        sigmas, made = schedule_search.search(net, draws, 5, teacher_steps=11, metric='solver', solver='ipndm',
                                              order=3, sweeps=2, progress=False)
        teacher_sigmas = solvers.edm_sigmas(11)
        target = schedule_search.teacher(net, draws[0][0], None, teacher_sigmas)
        error = schedule_search.solver_error(net, draws, [target], sigmas, solver='ipndm', order=3)
    errors = made['errors']
    assert made['start'] in ('edm', 'logsnr') and errors['searched'] == pytest.approx(error)
    assert error < 0.9 * min(errors['edm'], errors['logsnr'])
    solvers.check_sigmas(sigmas)
    assert sigmas[0].item() == pytest.approx(80, rel=1e-6) and sigmas[-1].item() == pytest.approx(0.002, rel=1e-6)

#----------------------------------------------------------------------------
# Command line.

def run_cli(*args):
    return CliRunner().invoke(schedule_search.main, list(args))

@pytest.fixture(scope='module')
def network_file(tmp_path_factory):
    path = str(tmp_path_factory.mktemp('net') / 'uncond.safetensors')
    save_safe(golden_network(UNCOND), path)
    return path

def test_cli_writes_levels_for_generate(tmp_path, network_file):
    out = tmp_path / 'levels.json'
    r = run_cli(f'--network={network_file}', '--steps=4', '--order=3', '--teacher-steps=9', '--seeds=0-2', '--check-seeds=7,9', '--batch=2',
                '--metric=l2', '--device=cpu', f'--out={out}')
    assert r.exit_code == 0, r.output
    doc = json.loads(out.read_text())
    assert len(doc['sigmas']) == 4 and doc['metric'] == 'l2' and doc['seeds'] == '0-2' and doc['teacher']['steps'] == 9
    teacher_sigmas = solvers.edm_sigmas(9)
    assert doc['sigmas'] == teacher_sigmas[doc['indices']].tolist()
    assert solvers.read_sigmas(str(out)) == doc['sigmas']
    assert set(doc['errors']) == {'edm', 'logsnr', 'searched'} and all(e > 0 for e in doc['errors'].values())
    assert doc['check_seeds'] == [7, 9] and set(doc['held_out_errors']) == set(doc['errors'])
    assert doc['held_out_errors'] != doc['errors'] # other latents, other errors

@pytest.mark.parametrize('args, message', [
    (['--steps=9', '--teacher-steps=5'], 'raise --teacher-steps'),
    (['--steps=4', '--solver=dpmpp', '--order=4'], 'orders 1 to 3'),
    (['--steps=4', '--sigma_min=5', '--sigma_max=1'], 'must be below'),
    (['--steps=4', '--metric=solver', '--order=5'], 'orders 1 to 4'),
])
def test_cli_bad_input_is_one_line(tmp_path, network_file, args, message):
    r = run_cli(f'--network={network_file}', '--seeds=0', '--teacher-steps=5', '--device=cpu', f'--out={tmp_path / "x.json"}', *args)
    assert r.exit_code != 0 and message in r.output, r.output
    assert not (tmp_path / 'x.json').exists()

#----------------------------------------------------------------------------
