"""tools/plot_training.py: curves from stats.jsonl (what is plotted, and that the image shows it), clear errors."""

import json

import numpy as np
import PIL.Image
from click.testing import CliRunner

from tools import plot_training

def write_run(path, losses, first_tick=0, kimg_per_tick=5.0):
    """stats.jsonl as the training loop writes it: one row per tick, from first_tick on."""
    path.mkdir()
    with open(path / 'stats.jsonl', 'w') as f:
        for i, loss in enumerate(losses):
            tick = first_tick + i
            f.write(json.dumps({'Progress/tick': {'num': 1, 'mean': tick, 'std': 0}, 'Progress/kimg': {'num': 1, 'mean': tick * kimg_per_tick, 'std': 0},
                                'Loss/loss': {'num': 8, 'mean': loss, 'std': 0.1}, 'Timing/aot_wait_frac': {'num': 1, 'mean': 0.01, 'std': 0}, 'timestamp': 1.0 + i}) + '\n')
    return str(path)

def plot(tmp_path, name, *runs):
    out = tmp_path / name
    res = CliRunner().invoke(plot_training.main, [a for run in runs for a in ['--run', run]] + ['--out', str(out), '--key', 'Loss/loss'])
    assert res.exit_code == 0, res.output
    assert f'to {out}' in res.output # says where the plot went
    return np.asarray(PIL.Image.open(out).convert('L'), dtype=np.float64)

def test_reads_what_the_loop_writes(tmp_path):
    # Tick 0 (one step) is left out of a fresh run; a resumed run's first row is a full tick and stays.
    kimg, stats = plot_training.read_stats(write_run(tmp_path / 'fresh', [9, 0.5, 0.3]))
    assert kimg == [5.0, 10.0] and stats['Loss/loss'] == [0.5, 0.3]
    kimg, stats = plot_training.read_stats(write_run(tmp_path / 'resumed', [0.25, 0.2], first_tick=3))
    assert kimg == [15.0, 20.0] and stats['Loss/loss'] == [0.25, 0.2]

def test_image_shows_the_curves(tmp_path):
    a, b = write_run(tmp_path / 'edm', [1, 0.5, 0.3]), write_run(tmp_path / 'aot', [1, 0.4, 0.2])
    both = plot(tmp_path, 'both.png', a, b)
    again = plot(tmp_path, 'again.png', a, b)
    (tmp_path / 'other').mkdir()
    other = plot(tmp_path, 'other.png', a, write_run(tmp_path / 'other' / 'aot', [1, 0.45, 0.1])) # same name, other losses
    assert both.shape == again.shape == other.shape and np.array_equal(both, again) # deterministic
    assert np.abs(both - other).sum() > 0 # other data, other picture

def test_plot_errors(tmp_path):
    res = CliRunner().invoke(plot_training.main, ['--run', str(tmp_path), '--out', str(tmp_path / 'x.png')])
    assert res.exit_code != 0 and 'stats.jsonl not found' in res.output
    run = write_run(tmp_path / 'r', [1])
    res = CliRunner().invoke(plot_training.main, ['--run', run, '--out', str(tmp_path / 'x.png'), '--key', 'Nope/nope'])
    assert res.exit_code != 0 and "No run has statistic 'Nope/nope'" in res.output
    assert not (tmp_path / 'x.png').exists()
