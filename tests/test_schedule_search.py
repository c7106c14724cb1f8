"""tools/schedule_search.py: GITS's dynamic programme and whole search against diff-sampler's golden
results, the solver-error descent, the command line and its JSON for generate.py --sigmas."""

import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from tools import schedule_search
from sampling import schedules, solvers
from training.network_io import save_safe
from tests.helpers import SOLVERS_DATA as DATA, SOLVERS_README as README, golden_network

pytestmark = pytest.mark.usefixtures('one_thread')
UNCOND = 'networks/ddpmpp_edm_uncond.npz'
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

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
    sigmas = schedules.get_sigmas('edm', 61, 0.002, 80, 7)
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
    # The path is a discrete result of float costs: it is diff-sampler's exactly when the costs' error
    # here cannot outweigh the reference's gap to its second-best path; otherwise (a near-tie on this
    # CPU's kernels) it must be as good, on the reference's costs, as the error allows.
    weights = cfg['coeff'] ** np.arange(cfg['num_steps'] - 1)
    total = lambda p, c: float((weights * c[p[:-1], p[1:]]).sum())
    error = float(weights.sum() * np.abs(cost - reference).max())
    best = total(cfg['dp_list'], reference)
    second = np.inf
    for a, b in zip(cfg['dp_list'], cfg['dp_list'][1:]):
        forbidden = reference.copy()
        forbidden[a, b] = np.inf
        second = min(second, total(schedule_search.best_path(forbidden, cfg['num_steps'], cfg['coeff']), forbidden))
    if second - best > 2 * error:
        assert path == cfg['dp_list']
        np.testing.assert_allclose(sigmas[path].numpy(), DATA[f'{case}/t_steps'], rtol=1e-6)
    else:
        assert total(path, reference) <= best + 2 * error, (path, cfg['dp_list'])

def test_teacher_path_holds_the_teachers_states_and_slopes():
    net = golden_network(UNCOND)
    sigmas = schedules.edm_sigmas(6)
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
        teacher_sigmas = schedules.edm_sigmas(11)
        target = schedule_search.teacher(net, draws[0][0], None, teacher_sigmas)
        error = schedule_search.solver_error(net, draws, [target], sigmas, solver='ipndm', order=3)
    errors = made['errors']
    assert made['start'] in ('edm', 'logsnr') and errors['searched'] == pytest.approx(error)
    assert error < 0.9 * min(errors['edm'], errors['logsnr'])
    schedules.check_sigmas(sigmas)
    assert sigmas[0].item() == pytest.approx(80, rel=1e-6) and sigmas[-1].item() == pytest.approx(0.002, rel=1e-6)

def test_gits_with_afs_inserts_the_best_level_after_the_first():
    """diff-sampler's GITS with AFS: GITS's levels and one teacher level k between the first two, the k
    whose levels give the solver (with AFS) the least error against the teacher; the NFE of GITS's levels without AFS."""
    net = golden_network(UNCOND)
    latents = torch.from_numpy(DATA['gits/warmup_latents'][:4])
    draws, teacher_sigmas = [(latents, None)], schedules.edm_sigmas(21)
    with torch.no_grad():
        plain, gits = schedule_search.search(net, draws, 5, teacher_steps=21, metric='dev', progress=False)
        sigmas, made = schedule_search.search(net, draws, 5, teacher_steps=21, metric='dev', afs=True, progress=False)
        target = schedule_search.teacher(net, latents, None, teacher_sigmas)
        error = lambda levels: schedule_search.solver_error(net, draws, [target], levels, solver='ipndm', afs=True)
        first, rest = gits['indices'][:1], gits['indices'][1:]
        errors = {k: error(teacher_sigmas[first + [k] + rest]) for k in range(1, rest[0])}
        fixed = {'edm': error(schedules.edm_sigmas(6)), 'logsnr': error(schedules.logsnr_sigmas(6))}
    assert len(errors) >= 3 and made['gits_indices'] == gits['indices']
    k = min(errors, key=errors.get)
    assert made['afs_level'] == k and made['indices'] == first + [k] + rest and torch.equal(sigmas, teacher_sigmas[made['indices']])
    assert made['errors'] == pytest.approx(dict(fixed, searched=errors[k]), rel=1e-12) # the fixed levels at the same NFE
    assert solvers.nfe('ipndm', len(sigmas), afs=True) == solvers.nfe('ipndm', len(plain)) == 4

def test_afs_level_tries_every_level_between_the_first_two():
    teacher_sigmas = schedules.edm_sigmas(11)
    for best in [1, 3, 5]: # the error is least with teacher level `best` second; 1 and 5 are the ends of the range
        error = lambda sigmas: abs(sigmas[1].item() - teacher_sigmas[best].item())
        assert schedule_search.afs_level(error, teacher_sigmas, [0, 6, 8, 10], progress=False) == ([0, best, 6, 8, 10], 0, best)
    assert schedule_search.afs_level(lambda sigmas: 1.0, teacher_sigmas, [0, 6, 10], progress=False) == ([0, 1, 6, 10], 1.0, 1) # ties: the smallest
    assert schedule_search.afs_level(lambda sigmas: len(sigmas), teacher_sigmas, [0, 1, 10], progress=False) == ([0, 1, 10], 3, None) # no room

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
    teacher_sigmas = schedules.edm_sigmas(9)
    assert doc['sigmas'] == teacher_sigmas[doc['indices']].tolist()
    assert schedules.read_sigmas(str(out)) == doc['sigmas']
    assert set(doc['errors']) == {'edm', 'logsnr', 'searched'} and all(e > 0 for e in doc['errors'].values())
    assert doc['check_seeds'] == [7, 9] and set(doc['held_out_errors']) == set(doc['errors'])
    assert doc['held_out_errors'] != doc['errors'] # other latents, other errors

@pytest.mark.slow
def test_torchrun_two_processes_pick_the_levels_of_one(tmp_path, network_file):
    """Two processes (gloo on the CPU) each take every other warm-up latent and sum the costs over both:
    the levels written are those of one process, exactly."""
    args = ['tools/schedule_search.py', f'--network={network_file}', '--steps=5', '--teacher-steps=13', '--seeds=0-6',
            '--batch=2', '--device=cpu']
    torchrun = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2']
    procs = {name: subprocess.Popen([*launch, *args, f'--out={tmp_path / name}.json'], cwd=ROOT, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for name, launch in [('one', [sys.executable]), ('two', torchrun)]}
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, f'{name}:\n{out[-3000:]}'
    one, two = (json.loads((tmp_path / f'{name}.json').read_text()) for name in procs)
    assert (one['processes'], two['processes']) == (1, 2)
    assert two['sigmas'] == one['sigmas'] and two['indices'] == one['indices']
    assert one['indices'] != [0, 3, 6, 9, 12] # not a trivial choice
    assert two['errors'] == pytest.approx(one['errors'], rel=1e-6) # the same means, summed in another order

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
