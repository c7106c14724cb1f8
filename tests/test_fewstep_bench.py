"""bench/fewstep_speed.py at tiny sizes, so that it keeps running: both tables, every sampler at its
NFE, ratios that are numbers. No absolute time is checked."""

import re

import pytest
from click.testing import CliRunner

from bench import fewstep_speed

pytestmark = pytest.mark.usefixtures('one_thread')
TINY = ['--batch=4', '--steps=5', '--rounds=1', '--search-seeds=0-4', '--search-steps=5', '--teacher-steps=7',
        '--search-rounds=1', '--device=cpu', '--no-doc']

@pytest.mark.slow # harness: bench/fewstep_speed.py end to end
def test_bench_runs_and_reports_every_ratio():
    result = CliRunner().invoke(fewstep_speed.main, TINY)
    assert result.exit_code == 0, result.output + repr(result.exception)
    table = re.findall(r'^\| (heun \(EDM, no --solver\)|`--solver=[a-z0-9-]+`) \| (\d+) \| ([0-9.]+) \| ([0-9.]+) \| ([0-9.]+) '
                       r'\(([0-9.]+)-([0-9.]+)\) \| ([0-9.]+) \| ([0-9.]+) \| ([0-9.]+) \| ([0-9.]+) \|$', result.output, re.M)
    rows = {name: (int(nfe), *map(float, numbers)) for name, nfe, *numbers in table}
    # 5 levels: Heun 2*5-1 NFE, DPM-Solver-2 two per step, the multistep solvers one per step.
    assert {name: row[0] for name, row in rows.items()} == {
        'heun (EDM, no --solver)': 9, '`--solver=ipndm`': 4, '`--solver=ipndm-v`': 4, '`--solver=dpmpp`': 4,
        '`--solver=unipc`': 4, '`--solver=deis`': 4, '`--solver=dpm2`': 8}
    for name, (nfe, loop, floor, direct, low, high, rest, ratio, solver, solver_ratio) in rows.items():
        assert low <= direct <= high and 0 < rest < loop and 0 < solver < loop, name # without the network: much less
        assert abs(floor / loop - direct) < 0.01 + 1e-3 / loop and 0 < ratio < 1 and 0 < solver_ratio < 1, name
    assert re.search(r'Lowest floor / \(floor \+ rest\): [a-z0-9-]+ at [0-9.]+: (meets|misses) the goal', result.output)
    search = re.findall(r'^\| (generate.py loop|search without|search:)[^|]* \| (\d+) \| ([0-9.]+) \| ([0-9.]+) \| ([0-9.]+) \| ([0-9.]+) \| ([0-9.]+) \|$',
                        result.output, re.M)
    assert [(name, int(nfe)) for name, nfe, *_ in search] == [('generate.py loop', 6), ('search without', 6), ('search:', 6 + 12)]
    assert float(search[0][3]) == float(search[0][6]) == 1 and all(float(seconds) > 0 for _, _, seconds, *_ in search)
    assert re.search(r'Search at [0-9.]+ of the sampling time \(decomposed; direct [0-9.]+\): (meets|misses) the goal', result.output)

def test_bench_takes_a_subset_and_refuses_unknown_samplers():
    result = CliRunner().invoke(fewstep_speed.main, [*TINY, '--solvers=unipc', '--search-rounds=0', '--loop-batches=3'])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert '(3 batches per loop:' in result.output and '`--solver=unipc` | 4 |' in result.output and 'ipndm`' not in result.output and 'Search at' not in result.output
    result = CliRunner().invoke(fewstep_speed.main, [*TINY, '--solvers=unipc,rk4'])
    assert result.exit_code != 0 and 'rk4: choose from heun,ipndm' in result.output.strip().splitlines()[-1], result.output

#----------------------------------------------------------------------------
# bench/fewstep_study.py on a tiny random network of the digits' shape.

from bench import fewstep_study
from training import networks
from sampling import schedules, solvers
from training.network_io import save_safe

def tiny_digits_network(path):
    import torch
    torch.manual_seed(0)
    net = networks.EDMPrecond(img_resolution=16, img_channels=1, label_dim=10, model_type='SongUNet', model_channels=16,
                              channel_mult=[1], num_blocks=1, attn_resolutions=[]).eval()
    save_safe(net, str(path))

@pytest.mark.slow # harness: bench/fewstep_study.py end to end
def test_study_runs_every_configuration_and_reports(tmp_path):
    import json, os
    tiny_digits_network(tmp_path / 'tiny.safetensors')
    data = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'datasets', 'uci-digits-16x16.zip')
    args = ['run', f'--data={data}', f'--network={tmp_path / "tiny.safetensors"}', '--name=tiny', '--nfe=4,5', '--heun-nfe=3,5',
            '--heun-fd-nfe=3,5', '--error-seeds=0-1', '--search-seeds=10-11', '--solver-search-seeds=12-13', '--solver-search-nfe=5',
            '--sweeps=1', '--fd-seeds=0-11', '--fd-seeds2=20-31', '--epochs=1', '--batch=12', f'--out={tmp_path / "r.json"}']
    result = CliRunner().invoke(fewstep_study.cli, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    rows = json.loads((tmp_path / 'r.json').read_text())['networks']['tiny']['rows']
    few = [r for r in rows if r['solver'] != 'heun']
    # Every solver x levels x AFS that has the NFE, on levels that give exactly that NFE.
    expected = {(s, lv, afs, n) for s in solvers.SOLVERS for lv in fewstep_study.LEVELS for afs in (False, True) for n in (4, 5)
                if fewstep_study.levels_for(s, n, afs) is not None} | {('ipndm', 'solver-search', False, 5)}
    assert {(r['solver'], r['levels'], r['afs'], r['nfe']) for r in few} == expected
    assert ('dpm2', 'edm', False, 4) in expected and ('dpm2', 'edm', False, 5) not in expected
    for r in few:
        assert solvers.nfe(r['solver'], len(r['sigmas']), r['afs']) == r['nfe'] and r['error'] > 0
        assert abs(r['sigmas'][0] - 80) < 1e-4 and abs(r['sigmas'][-1] - 0.002) < 1e-8 # float32 levels, as diff-sampler's
    teacher = schedules.get_sigmas('edm', 61, rho=7).tolist()
    assert all(s in teacher for r in few if r['levels'] == 'gits' for s in r['sigmas'])
    assert {(r['levels'], r['nfe']) for r in rows if r['solver'] == 'heun'} == {(f'edm-rho{rho}', n) for rho in (7, 72, 90) for n in (3, 5)}
    # FD-digits: the 2 least-error configurations of distinct solvers per NFE, a second draw of the best.
    for n in (4, 5):
        measured = [r for r in few if r['nfe'] == n and 'fd' in r]
        ranked = sorted((r for r in few if r['nfe'] == n), key=lambda r: r['error'])
        assert len(measured) == 2 and len({r['solver'] for r in measured}) == 2 and ranked[0] in measured
        assert [r for r in measured if 'fd2' in r] == [min(measured, key=lambda r: r['fd'])]
    result = CliRunner().invoke(fewstep_study.cli, ['report', f'--out={tmp_path / "s"}', str(tmp_path / 'r.json')])
    assert result.exit_code == 0, result.output + repr(result.exception)
    table = (tmp_path / 's.md').read_text()
    assert '| ipndm + AFS |' in table and '| solver-search |' in table and '| rho 90 |' in table and 'fewest NFE within 10%' in table
    assert all((tmp_path / f's-{k}.png').read_bytes()[:4] == b'\x89PNG' for k in ('error', 'fd'))

def test_study_refuses_even_heun_nfe():
    result = CliRunner().invoke(fewstep_study.cli, ['run', '--data=x', '--network=x', '--name=x', '--heun-nfe=8', '--out=x.json'])
    assert result.exit_code != 0 and 'odd NFE' in result.output
