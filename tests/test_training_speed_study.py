"""bench/training_speed_study.py at tiny sizes: train continues where it stopped, eval measures each
snapshot once with every metric, report writes its table and plots."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.helpers import ROOT
from training.testdata import make_dataset

def study(*args):
    proc = subprocess.run([sys.executable, 'bench/training_speed_study.py', *args], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout

@pytest.mark.slow # harness: two tiny trainings, their evaluation and report
def test_train_eval_report(tmp_path):
    data = make_dataset(tmp_path / 'data', n=64, res=8, num_classes=4)
    outdir = str(tmp_path / 'study')
    train = ['train', f'--data={data}', f'--outdir={outdir}', '--tick=0.032', '--couplings=edm,nearest-4', '--cond=1', '--seeds=0',
             '--extra=--cbase=8 --cres=1,1 --batch=16']
    study(*train, '--kimg=0.032')
    names = sorted(os.listdir(outdir))
    assert names == ['edm-cond-s0', 'nearest-4-cond-s0']
    evaluate = ['eval', f'--data={data}', f'--outdir={outdir}', '--fd-seeds=0-19', '--error-seeds=0-3', '--ref-steps=24', '--batch=20']
    assert '2 snapshots measured' in study(*evaluate)
    # A longer budget continues each run from its state (the ticks go on); eval then measures the new snapshot only.
    study(*train, '--kimg=0.064')
    for name in names:
        with open(os.path.join(outdir, name, 'stats.jsonl')) as f:
            kimg = [round(json.loads(line)['Progress/kimg']['mean'], 3) for line in f]
        assert kimg == [0.016, 0.032, 0.064], (name, kimg)
        assert os.path.isfile(os.path.join(outdir, name, 'network-snapshot-000000.pkl'))
    out = study(*evaluate)
    results = json.load(open(os.path.join(outdir, 'eval.json')))
    assert set(results['runs']) == set(names) and out.strip().splitlines() == [f'2 snapshots measured in {outdir}/eval.json'] # kimg 0 again: not re-measured
    for name in names:
        row = results['runs'][name]['0']
        assert {'fd11', 'fd35', 'error11', 'error35', 'class11', 'class35', 'provenance'} <= row.keys()
        assert row['fd35'] > 0 and 0 < row['error11'] and 0 <= row['class35'] <= 1
    # Snapshots off the --every grid (20 kimg) wait for a finer one.
    for name in names:
        shutil.copy(os.path.join(outdir, name, 'network-snapshot-000000.pkl'), os.path.join(outdir, name, 'network-snapshot-000005.pkl'))
    assert study(*evaluate).strip().splitlines() == [f'2 snapshots measured in {outdir}/eval.json']
    assert f'4 snapshots measured in {outdir}/eval.json' in study(*evaluate, '--every=5')
    # Other measuring options would mix two kinds of numbers in one file: refused.
    proc = subprocess.run([sys.executable, 'bench/training_speed_study.py', *evaluate[:-1], '--batch=20', '--fd-seeds=0-9'], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode != 0 and 'use those options or another --outdir' in proc.stderr
    report = study('report', f'--outdir={outdir}', f'--out={tmp_path / "speed"}')
    assert '| edm | 1 |' in report and '| nearest-4 | 1 |' in report
    for suffix in ('.md', '-kimg.png', '-time.png'):
        assert os.path.getsize(str(tmp_path / 'speed') + suffix) > 0

def test_time_axis_is_kimg_times_the_median_cost(tmp_path):
    """A tick stretched by a pause (or other work on the machine) must not shift the curve after it."""
    from bench.training_speed_study import curves
    os.makedirs(tmp_path / 'edm-uncond-s0')
    ticks = [(0, 30.0), (10, 6.0), (20, 6.0), (30, 600.0), (40, 6.0)] # tick 0: start-up; tick 3: paused
    with open(tmp_path / 'edm-uncond-s0' / 'stats.jsonl', 'w') as f:
        for kimg, cost in ticks:
            f.write(json.dumps({'Progress/kimg': {'mean': kimg}, 'Timing/sec_per_kimg': {'mean': cost},
                                'Timing/sec_per_tick': {'mean': cost * 10}}) + '\n')
    results = {'runs': {'edm-uncond-s0': {'40': {'fd35': 1.0}, '20': {'fd35': 2.0}}}}
    rows = curves(str(tmp_path), results)[('edm', False)][0]
    assert [(k, round(h * 3600)) for k, h, _ in rows] == [(20, 120), (40, 240)]
