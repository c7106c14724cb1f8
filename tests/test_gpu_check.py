"""bench/gpu_check.py: the smoke run exercises every check's code path on the CPU (so the command
cannot rot between GPU visits), and the goal lines, the stats reading, the budgets and the verdict
are checked on made-up figures."""

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
from click.testing import CliRunner

from bench import gpu_check
from bench.gpu_check import CheckFailed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def digest(path):
    return hashlib.sha256(open(path, 'rb').read()).hexdigest()

#----------------------------------------------------------------------------
# The whole command at tiny sizes.

def hide_lap(tmp_path):
    """An environment in which `import lap` fails, in this process's children and theirs."""
    shim = tmp_path / 'hide-lap'
    shim.mkdir()
    (shim / 'lap.py').write_text('raise ImportError("lap hidden by tests/test_gpu_check.py")\n')
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(shim), *filter(None, [os.environ.get('PYTHONPATH')])]))

def smoke(tmp_path, args, env=None):
    report = tmp_path / 'report.md'
    proc = subprocess.run([sys.executable, 'bench/gpu_check.py', '--smoke', f'--report={report}', f'--workdir={tmp_path / "work"}', *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=1200, env=env)
    return proc, report.read_text() if report.exists() else ''

@pytest.mark.slow
def test_smoke_without_lap_and_with_a_broken_step(tmp_path):
    # Every check's code path on the CPU, lap hidden (the device image has none), one step of
    # check 4 made to fail: that check fails with its figure, its other steps and every other
    # check still run and pass; the logs come back beside the report, whole.
    docs = os.path.join(ROOT, 'docs', 'benchmarks.md')
    before = digest(docs)
    env = dict(hide_lap(tmp_path), GPU_CHECK_BREAK='train_discriminator')
    proc, text = smoke(tmp_path, [], env)
    assert proc.returncode == 1, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert '**Verdict: FAIL (check 4)**' in text and 'SMOKE RUN' in text, text
    for num in gpu_check.DEFAULT:
        assert f'| {num} | {gpu_check.CHECKS[num][0]} | {"fail" if num == 4 else "pass"} |' in text, text
    assert '- train_discriminator.py: FAILED: train_discriminator.py: exit status 3' in text
    assert '- generate.py --dg: not run: needs a step that failed' in text
    for step in ['tools/ot_map.py', 'generate.py --ot-map', 'fid.py ref', 'fid.py calc', 'generate.py at batch 12', 'generate.py at batch 5']:
        assert f'- {step}: ok' in text, step
    assert re.search(r'the same PNGs at batch 12 and 5 \(up to 1 level\): ok: \d+/12 PNGs identical at batch 12 and 5, largest difference \d levels', text)
    assert 'lap no' in text and 'exact by scipy |' in text and 'lap is not installed here' in text
    assert text.count('| default | - |') == 1 and 'fast throughput' in text and 'fast loss curve' in text
    assert 'python bench/gpu_check.py --smoke' in text # the command
    assert digest(docs) == before
    # No snapshots or states where none are needed: only check 4's network is saved.
    saved = [os.path.relpath(os.path.join(d, n), tmp_path) for d, _, names in os.walk(tmp_path / 'work') for n in names
             if n.startswith(('network-snapshot-', 'training-state-'))]
    assert saved and all(path.startswith(os.path.join('work', 'net') + os.sep) for path in saved), saved
    with tarfile.open(tmp_path / 'report-logs.tar.gz') as tar:
        names = tar.getnames()
        broken = [n for n in names if 'train_discriminator' in n]
        assert len(broken) == 1 and b'broken on purpose' in tar.extractfile(broken[0]).read()
        assert any(n.endswith('stats.jsonl') for n in names) and not any(n.endswith(('.pkl', '.pt', '.png')) for n in names)
        first_log = tar.extractfile(sorted(n for n in names if '/logs/' in n)[0]).read().decode()
        assert first_log == open(tmp_path / 'work' / 'logs' / os.path.basename(sorted(n for n in names if '/logs/' in n)[0])).read()

@pytest.mark.slow
def test_smoke_with_lap(tmp_path):
    pytest.importorskip('lap')
    proc, text = smoke(tmp_path, ['--only=9,7'])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert '**Verdict: PASS**' in text and '| 0 | preflight' in text and 'lap yes' in text and 'exact by scipy/lap' in text, text
    assert '| lap | --aot-solver=lap |' in text and '| default | - |' in text # check 9's table

def test_aot_cost_defaults_to_the_installed_solvers(tmp_path):
    code = 'from bench import aot_cost; print(aot_cost.installed_solvers())'
    hidden = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, env=hide_lap(tmp_path), timeout=300)
    assert hidden.stdout.split() == ['scipy'], hidden.stderr
    shown = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert shown.stdout.split() == ['scipy,lap' if gpu_check.installed('lap') else 'scipy'], shown.stderr

def test_the_listed_cuda_tests_exist():
    tests = [t for group in [*gpu_check.CUDA_TESTS.values(), *gpu_check.SMOKE_TESTS.values()] for t in group]
    proc = subprocess.run([sys.executable, '-m', 'pytest', '--collect-only', '-q', '-p', 'no:cacheprovider', *tests], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]

#----------------------------------------------------------------------------
# Goal lines of the throughput check.

def run_figures(sec_per_kimg, aot_wait=0.0, losses=(1.0, 0.9, 0.8)):
    return dict(sec_per_kimg=sec_per_kimg, aot_wait=aot_wait, peak_gb=1.0, losses=list(losses))

def good_runs():
    return dict(aot0=run_figures(1.0), default=run_figures(1.01, aot_wait=0.005), seed1=run_figures(1.0, losses=(1.1, 0.8, 0.9)),
                fast=run_figures(0.5, losses=(1.0, 0.95, 0.8)))

def test_speed_goals_met():
    goals = gpu_check.speed_goals(good_runs()) + [gpu_check.curve_goal(good_runs())]
    assert len(goals) == 4 and all(met for _, met in goals), goals

@pytest.mark.parametrize('change, missed', [
    (dict(default=run_figures(1.01, aot_wait=0.02)), 'default aot_wait: 2.00%'),   # waits 2% for pools
    (dict(default=run_figures(1.03)), 'default sec/kimg: 1.030'),                 # AOT costs 3%
    (dict(fast=run_figures(0.52, losses=(1.0, 0.95, 0.8))), 'fast throughput: 1.94x'),
    (dict(fast=run_figures(0.5, losses=(1.0, 0.9, 1.2))), 'fast loss curve'),     # further from default than seed 1 is
    (dict(fast=None), 'fast throughput: not measured (no fast run)'),
    (dict(seed1=None), 'fast loss curve: not measured (no seed1 run)'),
])
def test_speed_goal_missed(change, missed):
    runs = {**good_runs(), **change}
    runs = {name: run for name, run in runs.items() if run is not None}
    goals = gpu_check.speed_goals(runs) + [gpu_check.curve_goal(runs)]
    failed = [line for line, met in goals if not met]
    assert failed and failed[0].startswith(missed), goals

def test_the_goal_runs_come_first_with_the_fast_configuration():
    assert list(gpu_check.SPEED_CONFIGS) == ['default', 'aot0', 'fast'] and gpu_check.SPEED_CONFIGS['fast'] == ['--tf32', '--bf16', '--compile']
    assert gpu_check.PHASES[0] == ('alone', [0, 2]) and 9 not in gpu_check.DEFAULT
    assert sorted(gpu_check.DEFAULT) == sorted(n for n in gpu_check.CHECKS if n != 9)

def test_missing_optional_package_is_reported_as_skipped(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, 'OPTIONAL', {'lap': 'no_such_package_here'})
    ctx = gpu_check.Context(smoke=True, workdir=str(tmp_path), start=time.time())
    runs, flags, notes = gpu_check.run_configs(ctx, {'lap': ['--aot-solver=lap']})
    assert not runs and notes == ['- lap: skipped, the optional no_such_package_here package is not installed (pip install no_such_package_here)']

def test_read_run_leaves_out_the_warm_up(tmp_path):
    # Ticks 0 and 1 (start-up, compilation) are slow and waiting; the steady ones are ticks 2-4.
    ticks = [(0.064, 30.0, 0.9, 2.0, 1.5), (1.088, 9.0, 0.5, 3.0, 1.2), (2.112, 2.0, 0.0, 3.0, 1.1), (3.136, 2.0, 0.03, 3.5, 1.0),
             (4.160, 4.0, 0.0, 3.0, 0.9)]
    with open(tmp_path / 'stats.jsonl', 'w') as f:
        for kimg, sec, wait, mem, loss in ticks:
            f.write(json.dumps({'Progress/kimg': {'mean': kimg}, 'Timing/sec_per_tick': {'mean': sec}, 'Timing/aot_wait_frac': {'mean': wait},
                                'Resources/peak_gpu_mem_gb': {'mean': mem}, 'Loss/loss': {'mean': loss}}) + '\n')
    r = gpu_check.read_run(str(tmp_path))
    assert r['sec_per_kimg'] == pytest.approx(8.0 / 3.072)
    assert r['aot_wait'] == pytest.approx(0.03 * 2 / 8) # weighted by the ticks' lengths
    assert r['peak_gb'] == 3.5 and r['losses'] == [1.5, 1.2, 1.1, 1.0, 0.9]
    with open(tmp_path / 'stats.jsonl') as f:
        first_two = f.readlines()[:2]
    with open(tmp_path / 'stats.jsonl', 'w') as f:
        f.writelines(first_two)
    with pytest.raises(CheckFailed, match='2 ticks, need more than 2'):
        gpu_check.read_run(str(tmp_path))

#----------------------------------------------------------------------------
# Running programs within a budget, and none outliving gpu_check.

def gone(pid, wait=10):
    # Dead, or a zombie waiting for whoever inherited it to reap it.
    end = time.time() + wait
    while time.time() < end:
        try:
            with open(f'/proc/{pid}/stat') as f:
                if f.read().rsplit(')', 1)[1].split()[0] == 'Z':
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.1)
    return False

# A program that starts a child in a session of its own (as torchrun starts its workers), prints
# both pids and sleeps.
SLEEPER = ('import subprocess, sys, time; child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True); '
           'import os; print("pids", os.getpid(), child.pid, flush=True); time.sleep(60)')

def context(tmp_path, **kwargs):
    (tmp_path / 'logs').mkdir(parents=True, exist_ok=True)
    return gpu_check.Context(smoke=True, workdir=str(tmp_path), start=time.time(), **kwargs)

@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='reads /proc')
def test_sh_stops_at_the_budget_and_reports_failures(tmp_path):
    ctx = context(tmp_path)
    ctx.deadline = time.time() + 5
    start = time.time()
    with pytest.raises(CheckFailed, match="stopped at the check's budget") as err:
        ctx.sh([sys.executable, '-c', SLEEPER], 'sleeper')
    assert time.time() - start < 30
    pids = [int(pid) for pid in re.search(r'^pids (\d+) (\d+)$', str(err.value), re.M).groups()]
    assert all(gone(pid) for pid in pids) # its children go too, even in sessions of their own (a torchrun's workers)
    ctx.deadline = time.time() + 60
    with pytest.raises(CheckFailed, match=r'(?s)crasher: exit status 3 \(logs/\d+-check0-crasher.log\)\n.*last words'):
        ctx.sh([sys.executable, '-c', 'import sys; print("last words"); sys.exit(3)'], 'crasher')
    assert ctx.sh([sys.executable, '-c', 'print("fine")'], 'fine').rstrip().endswith('fine')
    ctx.deadline = time.time()
    with pytest.raises(CheckFailed, match='no time left'):
        ctx.sh([sys.executable, '-c', 'pass'], 'late')

def test_checks_share_one_copy_of_the_digits(tmp_path, monkeypatch):
    # Made once for every check (side by side, programs read them while others start).
    made = []
    monkeypatch.setattr(gpu_check, 'make_digits', lambda dest, res: made.append(dest) or dest)
    ctx = context(tmp_path)
    a, b = ctx.for_check(4, time.time() + 60), ctx.for_check(1, time.time() + 60)
    assert a.digits() == b.digits() == ctx.digits() and len(made) == 1

def test_sh_breaks_the_steps_named(tmp_path, monkeypatch):
    monkeypatch.setenv('GPU_CHECK_BREAK', 'second, third')
    ctx = context(tmp_path)
    assert ctx.sh([sys.executable, '-c', 'print("ran")'], 'first step').strip().endswith('ran')
    with pytest.raises(CheckFailed, match=r"(?s)the second step: exit status 3.*broken on purpose"):
        ctx.sh([sys.executable, '-c', 'print("ran")'], 'the second step')

@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='reads /proc')
def test_sigkill_of_gpu_check_leaves_no_program_running(tmp_path):
    # The watchdog kills what gpu_check started when gpu_check dies, however it dies.
    code = ('import sys, time; from bench import gpu_check; '
            f'ctx = gpu_check.Context(True, {str(tmp_path)!r}, time.time(), watchdog=gpu_check.Watchdog()); '
            f'ctx.sh([sys.executable, "-c", {SLEEPER!r}], "sleeper")')
    (tmp_path / 'logs').mkdir()
    proc = subprocess.Popen([sys.executable, '-c', code], cwd=ROOT)
    end, pids = time.time() + 120, None
    while time.time() < end and not pids:
        logs = list((tmp_path / 'logs').glob('*.log'))
        found = re.search(r'^pids (\d+) (\d+)$', logs[0].read_text(), re.M) if logs else None
        pids = [int(pid) for pid in found.groups()] if found else None
        time.sleep(0.2)
    assert pids, 'the sleeper did not start'
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert all(gone(pid, wait=20) for pid in pids)

#----------------------------------------------------------------------------
# Steps, figures, verdicts per test group, the logs.

def test_steps_isolate_failures():
    steps = gpu_check.Steps(None)
    a = steps.start('a', lambda: (1, 'one'))
    b = steps.start('b', lambda: 1 / 0)
    c = steps.start('c', lambda x: (x + 1, f'got {x}'), a)
    steps.start('d', lambda x: (x, 'never'), b)
    def broken():
        raise CheckFailed('e broke: figure 7\nlast lines')
    steps.start('e', broken)
    ok, lines = steps.finish()
    assert not ok and c.result() == 2
    assert lines[:4] == ['- a: ok: one', '- b: FAILED: ZeroDivisionError: division by zero', '- c: ok: got 1', '- d: not run: needs a step that failed']
    assert lines[4] == '- e: FAILED: e broke: figure 7' and 'last lines' in lines

def test_pngs_compared_by_figures():
    a = {f'{i:06d}.png': np.full((4, 4, 3), 100, np.uint8) for i in range(5)}
    b = {name: img.copy() for name, img in a.items()}
    b['000003.png'][1, 2, 0] = 101
    assert gpu_check.compare_pngs(a, b) == (4, 5, 1)
    b['000004.png'][0, 0, 1] = 97
    assert gpu_check.compare_pngs(a, b) == (3, 5, 3)

def write_tests(path):
    path.write_text('import time\n'
                    'def test_fine():\n    pass\n'
                    'def test_broken():\n    assert False\n'
                    'def test_hangs():\n    time.sleep(120)\n')

@pytest.mark.slow # harness: a group that hangs past its timeout
def test_tests_get_verdicts_per_group_when_one_hangs(tmp_path, monkeypatch):
    tests = tmp_path / 'scratch_tests.py'
    write_tests(tests)
    monkeypatch.setattr(gpu_check, 'SMOKE_TESTS', {'fine': [f'{tests}::test_fine'], 'broken': [f'{tests}::test_broken', f'{tests}::test_fine'],
                                                   'hangs': [f'{tests}::test_hangs']})
    ctx = context(tmp_path / 'w', jobs=3)
    ctx.deadline = time.time() + 30
    ok, summary, lines = gpu_check.check_tests(ctx)
    assert not ok and summary == '1 of 3 groups passed (4 tests)', summary
    assert lines[0] == '- pytest fine (1 tests): ok: 1 passed: test_fine passed (no CUDA here: skips expected)'
    assert lines[1] == '- pytest broken (2 tests): FAILED: 1 passed, 1 failed: test_broken failed, test_fine passed'
    assert any(line.startswith("- pytest hangs (1 tests): FAILED: pytest hangs: test_hangs: stopped at the check's budget") for line in lines), lines

def test_logs_packed_whole_without_the_large_files(tmp_path):
    (tmp_path / 'logs').mkdir()
    (tmp_path / 'logs' / '001-x.log').write_text('line\n' * 10000)
    (tmp_path / 'speed' / 'default').mkdir(parents=True)
    (tmp_path / 'speed' / 'default' / 'stats.jsonl').write_text('{}\n')
    (tmp_path / 'speed' / 'default' / 'network-snapshot-000000.pkl').write_bytes(b'x')
    dest = tmp_path / 'r-logs.tar.gz'
    gpu_check.pack_logs(str(tmp_path), str(dest))
    with tarfile.open(dest) as tar:
        assert sorted(tar.getnames()) == ['gpu-check-logs/logs/001-x.log', 'gpu-check-logs/speed/default/stats.jsonl']
        assert tar.extractfile('gpu-check-logs/logs/001-x.log').read() == b'line\n' * 10000
    assert gpu_check.logs_path('/out/gpu-check.md') == '/out/gpu-check-logs.tar.gz'

#----------------------------------------------------------------------------
# The verdict: one failing, crashing or interrupted check fails the run; the others still report.

def fake_checks(monkeypatch, events, phases=None):
    def passes(ctx):
        events.append('passes')
        return True, 'fine figures', ['- details']
    def fails(ctx):
        events.append('fails')
        raise CheckFailed('it broke\nlast lines of its output')
    def crashes(ctx):
        events.append('crashes')
        return 1 / 0
    def misses(ctx):
        events.append('misses')
        return False, 'goal missed', []
    def interrupted(ctx):
        raise KeyboardInterrupt
    monkeypatch.setattr(gpu_check, 'CHECKS', {0: ('zero', passes), 1: ('one', passes), 5: ('five', fails), 6: ('six', crashes),
                                              3: ('three', misses), 4: ('four', interrupted), 2: ('two', passes)})
    phases = phases or [('alone', [0, 1, 5, 6, 3, 4, 2])]
    monkeypatch.setattr(gpu_check, 'PHASES', phases)
    monkeypatch.setattr(gpu_check, 'DEFAULT', [num for _, nums in phases for num in nums])
    monkeypatch.setattr(gpu_check.report, 'update_section', lambda *a, **k: pytest.fail('smoke and --only runs must not touch the docs'))

def test_failures_and_interruption_are_reported(tmp_path, monkeypatch):
    events = []
    fake_checks(monkeypatch, events)
    report = tmp_path / 'r.md'
    result = CliRunner().invoke(gpu_check.main, ['--smoke', f'--report={report}'])
    assert result.exit_code == 1, result.output
    assert events == ['passes', 'passes', 'fails', 'crashes', 'misses'] # each ran after the previous one failed; 2 never started
    text = report.read_text()
    assert '**Verdict: FAIL (checks 5, 6, 3, 4, 2)**' in text and '`r-logs.tar.gz`' in text
    assert '| 1 | one | pass |' in text and '| 5 | five | fail |' in text and 'last lines of its output' in text
    assert '| 6 | six | fail |' in text and 'ZeroDivisionError' in text
    assert '| 3 | three | fail |' in text and '| 4 | four | not run | 0 | interrupted |' in text and '| 2 | two | not run |' in text
    assert (tmp_path / 'r-logs.tar.gz').exists()

def test_side_by_side_checks_each_report(tmp_path, monkeypatch):
    events = []
    fake_checks(monkeypatch, events, [('alone', [0]), ('side by side', [5, 1, 6, 3])])
    report = tmp_path / 'r.md'
    result = CliRunner().invoke(gpu_check.main, ['--smoke', f'--report={report}'])
    assert result.exit_code == 1, result.output
    assert sorted(events) == ['crashes', 'fails', 'misses', 'passes', 'passes']
    text = report.read_text()
    assert '**Verdict: FAIL (checks 5, 6, 3)**' in text and '| 1 | one | pass |' in text and '| 0 | zero | pass |' in text

def test_only_runs_the_checks_named_after_the_preflight(tmp_path, monkeypatch):
    events = []
    fake_checks(monkeypatch, events)
    result = CliRunner().invoke(gpu_check.main, ['--smoke', '--only=2,1', f'--report={tmp_path / "r.md"}'])
    assert result.exit_code == 0, result.output
    text = (tmp_path / 'r.md').read_text()
    assert events == ['passes'] * 3 and '**Verdict: PASS**' in text and '| 0 | zero | pass |' in text and '| 5 |' not in text

@pytest.mark.parametrize('args, message', [
    (['--only=2,99'], '--only'),
    (['--only=two'], '--only'),
    (['--report=/nonexistent-folder/r.md'], 'does not exist'),
    (['--workdir={tmp}'], 'is not empty'),
])
def test_bad_input(tmp_path, monkeypatch, args, message):
    events = []
    fake_checks(monkeypatch, events)
    (tmp_path / 'old-run').mkdir()
    result = CliRunner().invoke(gpu_check.main, ['--smoke', *(a.format(tmp=tmp_path) for a in args)])
    assert result.exit_code == 2 and message in result.output and not events, result.output

def test_refused_without_a_gpu_unless_smoke(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check.torch.cuda, 'is_available', lambda: False)
    result = CliRunner().invoke(gpu_check.main, [f'--report={tmp_path / "r.md"}'])
    assert result.exit_code == 1 and 'no CUDA device here' in result.output and '--smoke' in result.output
    assert not (tmp_path / 'r.md').exists()
