"""bench/fewstep_speed.py at tiny sizes, so that it keeps running: both tables, every sampler at its
NFE, ratios that are numbers. No absolute time is checked."""

import os
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
    table = re.findall(r'^\| (heun \(EDM, no --solver\)|`--solver=[a-z0-9_-]+`) \| (\d+) \| ([0-9.]+) \| ([0-9.]+) \| ([0-9.]+) '
                       r'\(([0-9.]+)-([0-9.]+)\) \| ([0-9.]+) \| ([0-9.]+) \| ([0-9.]+) \| ([0-9.]+) \|$', result.output, re.M)
    rows = {name: (int(nfe), *map(float, numbers)) for name, nfe, *numbers in table}
    # 5 levels: Heun 2*5-1 NFE, DPM-Solver-2 two per step, the multistep and stochastic solvers one per step.
    assert {name: row[0] for name, row in rows.items()} == {
        'heun (EDM, no --solver)': 9, '`--solver=ipndm`': 4, '`--solver=ipndm-v`': 4, '`--solver=dpmpp`': 4,
        '`--solver=unipc`': 4, '`--solver=deis`': 4, '`--solver=dpm2`': 8,
        '`--solver=euler_ancestral`': 4, '`--solver=dpmpp_2m_sde`': 4}
    for name, (nfe, loop, floor, direct, low, high, rest, ratio, solver, solver_ratio) in rows.items():
        assert low <= direct <= high and 0 < rest < loop and 0 < solver < loop, name # without the network: much less
        assert abs(floor / loop - direct) < 0.01 + 1e-3 / loop and 0 < ratio < 1 and 0 < solver_ratio < 1, name
    lowest = re.search(r'^Lowest floor / \(floor \+ rest\): ([a-z0-9_-]+) at ([0-9.]+): (meets|misses) the goal', result.output, re.M)
    assert lowest, result.output
    assert float(lowest[2]) == min(row[7] for row in rows.values()) and (lowest[3] == 'meets') == (float(lowest[2]) >= 0.95), lowest[0]
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
    # Ranked by the selection seeds' error, not by the reported one.
    for n in (4, 5):
        measured = [r for r in few if r['nfe'] == n and 'fd' in r]
        ranked = sorted((r for r in few if r['nfe'] == n), key=lambda r: r['select_error'])
        assert len(measured) == 2 and len({r['solver'] for r in measured}) == 2 and ranked[0] in measured
        assert min(measured, key=lambda r: r['fd']) in [r for r in measured if 'fd2' in r]
    # The fewest NFE within 10% of Heun 35: picked on the first draw, its second draw checked against Heun's.
    res = json.loads((tmp_path / 'r.json').read_text())['networks']['tiny']
    heun = res['heun_fd']
    for family, pick in res['fewest'].items():
        row = next(r for r in rows if r['nfe'] == pick['nfe'] and 'fd' in r and r['fd'] == pick['fd'])
        assert pick['fd'] <= 1.1 * heun['fd'] and pick['fd2'] == row['fd2'] and pick['holds'] == (row['fd2'] <= 1.1 * heun['fd2'])
    result = CliRunner().invoke(fewstep_study.cli, ['report', f'--out={tmp_path / "s"}', str(tmp_path / 'r.json')])
    assert result.exit_code == 0, result.output + repr(result.exception)
    table = (tmp_path / 's.md').read_text()
    assert '| ipndm + AFS |' in table and '| solver-search |' in table and '| rho 90 |' in table and 'fewest NFE within 10%' in table
    assert all((tmp_path / f's-{k}.png').read_bytes()[:4] == b'\x89PNG' for k in ('error', 'fd'))

def test_study_refuses_even_heun_nfe():
    result = CliRunner().invoke(fewstep_study.cli, ['run', '--data=x', '--network=x', '--name=x', '--heun-nfe=8', '--out=x.json'])
    assert result.exit_code != 0 and 'odd NFE' in result.output

def test_study_refuses_what_it_cannot_run():
    run = lambda *args: CliRunner().invoke(fewstep_study.cli, ['run', '--network=x', '--name=x', '--out=x.json', *args])
    result = run('--solvers=ipndm,rk4', '--no-fd')
    assert result.exit_code != 0 and 'rk4: choose from euler,ipndm' in result.output, result.output
    result = run('--levels=edm,cosine', '--no-fd')
    assert result.exit_code != 0 and 'cosine: choose from edm,logsnr,gits' in result.output, result.output
    result = run('--select-seeds=30-40', '--no-fd') # overlaps --error-seeds 0-31
    assert result.exit_code != 0 and 'disjoint' in result.output, result.output
    result = run() # FD-digits without --data
    assert result.exit_code != 0 and '--no-fd' in result.output, result.output

@pytest.mark.slow # harness: bench/fewstep_study.py run end to end
def test_study_runs_a_subset_without_fd_and_records_provenance(tmp_path):
    import json, subprocess, torch
    tiny_digits_network(tmp_path / 'tiny.safetensors')
    args = ['run', f'--network={tmp_path / "tiny.safetensors"}', '--name=tiny', '--solvers=unipc,ipndm', '--levels=logsnr,edm', '--nfe=4',
            '--heun-nfe=3', '--solver-search-nfe=5', '--error-seeds=0-1', '--select-seeds=2-3', '--batch=4', '--no-fd', f'--out={tmp_path / "r.json"}']
    result = CliRunner().invoke(fewstep_study.cli, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert 'picked on seeds 2-3 (2), errors reported on seeds 0-1 (2)' in result.output
    record = json.loads((tmp_path / 'r.json').read_text())
    rows = record['networks']['tiny']['rows']
    few = [r for r in rows if r['solver'] != 'heun']
    # Only the solvers and levels asked for (the solver search too: iPNDM is among them), no FD-digits.
    assert {(r['solver'], r['levels'], r['afs'], r['nfe']) for r in few} == {
        (s, lv, afs, 4) for s in ('unipc', 'ipndm') for lv in ('logsnr', 'edm') for afs in (False, True)} | {('ipndm', 'solver-search', False, 5)}
    assert {(r['levels'], r['nfe']) for r in rows if r['solver'] == 'heun'} == {(f'edm-rho{rho}', 3) for rho in (7, 72, 90)}
    assert not any('fd' in r or 'fd2' in r for r in rows) and 'heun_fd' not in record['networks']['tiny']
    assert record['settings']['fd'] is False and record['settings']['classifier_accuracy'] is None
    # Two disjoint seed sets: a selection error beside the reported one, from other latents.
    assert all(r['select_error'] > 0 and r['error'] > 0 and r['select_error'] != r['error'] for r in few)
    assert all('select_error' not in r for r in rows if r['solver'] == 'heun')
    # Provenance: this checkout's commit, torch, the thread count it ran with.
    head = subprocess.run(['git', 'rev-parse', 'HEAD'], capture_output=True, text=True, cwd=os.path.dirname(__file__)).stdout.strip()
    prov = record['settings']['provenance']
    assert prov['commit'] == head and isinstance(prov['dirty'], bool) and prov['torch'] == torch.__version__
    assert prov['threads'] == torch.get_num_threads() == 1 and prov['cores'] == os.cpu_count() and prov['cpu']
    assert record['networks']['tiny']['provenance'] == prov
    result = CliRunner().invoke(fewstep_study.cli, ['report', f'--out={tmp_path / "s"}', str(tmp_path / 'r.json')])
    assert result.exit_code == 0, result.output + repr(result.exception)
    table = (tmp_path / 's.md').read_text()
    assert f'Made at commit {head[:12]}' in table and 'picked on seeds 2-3' in table and '| unipc + AFS |' in table

def test_report_picks_on_the_selection_seeds(tmp_path):
    import json
    row = lambda lv, error, select: dict(solver='ipndm', levels=lv, afs=False, nfe=4, sigmas=[80, 0.002], error=error, select_error=select)
    # logsnr has the least reported error, edm the least selection error: edm is picked, with its own error.
    rows = [row('logsnr', 0.1, 0.3), row('edm', 0.2, 0.1), row('gits', 0.3, 0.2)]
    (tmp_path / 'r.json').write_text(json.dumps(dict(networks=dict(net=dict(rows=rows, picking='picked on 2 held-out seeds')))))
    old = [{k: v for k, v in r.items() if k != 'select_error'} for r in rows] # an older run: picked on the reported error
    (tmp_path / 'old.json').write_text(json.dumps(dict(networks=dict(old=dict(rows=old)))))
    result = CliRunner().invoke(fewstep_study.cli, ['report', f'--out={tmp_path / "s"}', str(tmp_path / 'r.json'), str(tmp_path / 'old.json')])
    assert result.exit_code == 0, result.output + repr(result.exception)
    table = (tmp_path / 's.md').read_text()
    net, old_table = table.split('### old:', 1)
    assert '| ipndm | 0.2000 (edm) |' in net and 'picked on 2 held-out seeds' in net
    assert '| ipndm | 0.1000 (logsnr) |' in old_table and 'an older run: optimistic' in old_table
