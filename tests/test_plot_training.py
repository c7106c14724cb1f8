"""tools/plot_training.py: curves from stats.jsonl, clear errors."""

import json
import os
import sys

from click.testing import CliRunner

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'tools'))
import plot_training

def write_run(path, losses):
    path.mkdir()
    with open(path / 'stats.jsonl', 'w') as f:
        for i, loss in enumerate(losses):
            f.write(json.dumps({'Progress/kimg': {'num': 1, 'mean': i * 5.0, 'std': 0}, 'Loss/loss': {'num': 8, 'mean': loss, 'std': 0.1},
                                'Timing/aot_wait_frac': {'num': 1, 'mean': 0.01, 'std': 0}, 'timestamp': 1.0 + i}) + '\n')
    return str(path)

def test_plot_two_runs(tmp_path):
    a, b = write_run(tmp_path / 'edm', [1, 0.5, 0.3]), write_run(tmp_path / 'aot', [1, 0.4, 0.2])
    out = tmp_path / 'curves.png'
    res = CliRunner().invoke(plot_training.main, ['--run', a, '--run', b, '--out', str(out), '--key', 'Loss/loss'])
    assert res.exit_code == 0, res.output
    assert out.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'

def test_plot_errors(tmp_path):
    res = CliRunner().invoke(plot_training.main, ['--run', str(tmp_path), '--out', str(tmp_path / 'x.png')])
    assert res.exit_code != 0 and 'stats.jsonl not found' in res.output
    run = write_run(tmp_path / 'r', [1])
    res = CliRunner().invoke(plot_training.main, ['--run', run, '--out', str(tmp_path / 'x.png'), '--key', 'Nope/nope'])
    assert res.exit_code != 0 and "No run has statistic 'Nope/nope'" in res.output
    assert not (tmp_path / 'x.png').exists()
