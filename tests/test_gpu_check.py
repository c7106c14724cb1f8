"""bench/gpu_check.py: the smoke run exercises every check's code path on the CPU (so the command
cannot rot between GPU visits), and the goal lines, the stats reading, the budgets and the verdict
are checked on made-up figures."""

import hashlib
import json
import os
import re
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from bench import gpu_check
from bench.gpu_check import CheckFailed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def digest(path):
    return hashlib.sha256(open(path, 'rb').read()).hexdigest()

#----------------------------------------------------------------------------
# The whole command at tiny sizes.

@pytest.mark.slow
def test_smoke_runs_every_check_and_leaves_the_docs_alone(tmp_path):
    docs = os.path.join(ROOT, 'docs', 'benchmarks.md')
    before = digest(docs)
    report = tmp_path / 'report.md'
    proc = subprocess.run([sys.executable, 'bench/gpu_check.py', '--smoke', f'--report={report}'], cwd=ROOT,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    text = report.read_text()
    assert '**Verdict: PASS**' in text and 'SMOKE RUN' in text
    for num, (title, _) in gpu_check.CHECKS.items():
        assert f'| {num} | {title} | pass |' in text
    assert text.count('| default | - |') == 1 and 'fast throughput' in text # the throughput table and its goals
    assert 'python bench/gpu_check.py --smoke' in text # the command
    assert digest(docs) == before

#----------------------------------------------------------------------------
# Goal lines of the throughput check.

def run_figures(sec_per_kimg, aot_wait=0.0, losses=(1.0, 0.9, 0.8)):
    return dict(sec_per_kimg=sec_per_kimg, aot_wait=aot_wait, peak_gb=1.0, losses=list(losses))

def good_runs():
    return dict(aot0=run_figures(1.0), default=run_figures(1.01, aot_wait=0.005), workers=run_figures(1.0, losses=(1.1, 0.8, 0.9)),
                fast=run_figures(0.5, losses=(1.0, 0.95, 0.8)))

def test_speed_goals_met():
    goals = gpu_check.speed_goals(good_runs())
    assert len(goals) == 4 and all(met for _, met in goals), goals

@pytest.mark.parametrize('change, missed', [
    (dict(default=run_figures(1.01, aot_wait=0.02)), 'default aot_wait: 2.00%'),   # waits 2% for pools
    (dict(default=run_figures(1.03)), 'default sec/kimg: 1.030'),                 # AOT costs 3%
    (dict(fast=run_figures(0.52, losses=(1.0, 0.95, 0.8))), 'fast throughput: 1.94x'),
    (dict(fast=run_figures(0.5, losses=(1.0, 0.9, 1.2))), 'fast loss curve'),     # further from default than seed 1 is
    (dict(fast=None), 'fast throughput: not measured (no fast run)'),
])
def test_speed_goal_missed(change, missed):
    runs = {**good_runs(), **change}
    runs = {name: run for name, run in runs.items() if run is not None}
    goals = gpu_check.speed_goals(runs)
    failed = [line for line, met in goals if not met]
    assert failed and failed[0].startswith(missed), goals

def test_fast_flags_take_the_fastest_mode():
    runs = dict(tf32=run_figures(0.8), bf16=run_figures(0.6), fp16=run_figures(0.7))
    assert gpu_check.fast_flags(runs) == ['--bf16', '--tf32', '--compile']
    assert gpu_check.fast_flags(dict(tf32=run_figures(0.8))) == ['--tf32', '--compile']
    with pytest.raises(CheckFailed, match='no numeric mode ran'):
        gpu_check.fast_flags(dict(default=run_figures(1.0)))

def test_missing_optional_package_is_reported_as_skipped(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, 'OPTIONAL', {'lap': 'no_such_package_here'})
    ctx = gpu_check.Context(smoke=True, workdir=str(tmp_path), start=time.time())
    ctx.size = dict(ctx.size, speed_only=['lap'])
    ok, summary, lines = gpu_check.check_speed(ctx)
    assert '- lap: skipped, the optional no_such_package_here package is not installed (pip install no_such_package_here)' in lines

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
# Running programs within a budget.

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

def test_sh_stops_at_the_budget_and_reports_failures(tmp_path):
    (tmp_path / 'logs').mkdir()
    ctx = gpu_check.Context(smoke=True, workdir=str(tmp_path), start=time.time())
    ctx.deadline = time.time() + 3
    start = time.time()
    with pytest.raises(CheckFailed, match="stopped at the check's budget") as err:
        ctx.sh([sys.executable, '-c', 'import subprocess, sys, time; child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]); '
                'print("child", child.pid, flush=True); time.sleep(60)'], 'sleeper')
    assert time.time() - start < 30
    child = int(re.search(r'^child (\d+)$', str(err.value), re.M).group(1))
    assert gone(child) # its children go too (a torchrun's workers, pytest's subprocesses)
    ctx.deadline = time.time() + 60
    with pytest.raises(CheckFailed, match=r'(?s)crasher: exit status 3\n.*last words'):
        ctx.sh([sys.executable, '-c', 'import sys; print("last words"); sys.exit(3)'], 'crasher')
    assert ctx.sh([sys.executable, '-c', 'print("fine")'], 'fine').rstrip().endswith('fine')
    ctx.deadline = time.time()
    with pytest.raises(CheckFailed, match='no time left'):
        ctx.sh([sys.executable, '-c', 'pass'], 'late')

#----------------------------------------------------------------------------
# The verdict: one failing, crashing or interrupted check fails the run; the others still report.

def fake_checks(monkeypatch, events):
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
    monkeypatch.setattr(gpu_check, 'CHECKS', {1: ('one', passes), 5: ('five', fails), 6: ('six', crashes), 3: ('three', misses),
                                              4: ('four', interrupted), 2: ('two', passes)})
    monkeypatch.setattr(gpu_check.report, 'update_section', lambda *a, **k: pytest.fail('smoke and --only runs must not touch the docs'))

def test_failures_and_interruption_are_reported(tmp_path, monkeypatch):
    events = []
    fake_checks(monkeypatch, events)
    report = tmp_path / 'r.md'
    result = CliRunner().invoke(gpu_check.main, ['--smoke', f'--report={report}'])
    assert result.exit_code == 1, result.output
    assert events == ['passes', 'fails', 'crashes', 'misses'] # each ran after the previous one failed; 2 never started
    text = report.read_text()
    assert '**Verdict: FAIL (checks 5, 6, 3, 4, 2)**' in text
    assert '| 1 | one | pass |' in text and '| 5 | five | fail |' in text and 'last lines of its output' in text
    assert '| 6 | six | fail |' in text and 'ZeroDivisionError' in text
    assert '| 3 | three | fail |' in text and '| 4 | four | not run | 0 | interrupted |' in text and '| 2 | two | not run |' in text

def test_only_runs_the_checks_named(tmp_path, monkeypatch):
    events = []
    fake_checks(monkeypatch, events)
    result = CliRunner().invoke(gpu_check.main, ['--smoke', '--only=2,1', f'--report={tmp_path / "r.md"}'])
    assert result.exit_code == 0, result.output
    assert events == ['passes', 'passes'] and '**Verdict: PASS**' in (tmp_path / 'r.md').read_text()

@pytest.mark.parametrize('args, message', [
    (['--only=2,9'], '--only'),
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
