"""bench/fewstep_speed.py at tiny sizes, so that it keeps running: both tables, every sampler at its
NFE, ratios that are numbers. No absolute time is checked."""

import re

import pytest
from click.testing import CliRunner

from bench import fewstep_speed

pytestmark = pytest.mark.usefixtures('one_thread')
TINY = ['--batch=4', '--steps=5', '--rounds=1', '--search-seeds=0-4', '--search-steps=5', '--teacher-steps=7',
        '--search-rounds=1', '--device=cpu', '--no-doc']

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
    result = CliRunner().invoke(fewstep_speed.main, [*TINY, '--solvers=unipc', '--search-rounds=0'])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert '`--solver=unipc` | 4 |' in result.output and 'ipndm`' not in result.output and 'Search at' not in result.output
    result = CliRunner().invoke(fewstep_speed.main, [*TINY, '--solvers=unipc,rk4'])
    assert result.exit_code != 0 and 'rk4: choose from heun,ipndm' in result.output.strip().splitlines()[-1], result.output
