"""training/monitor.py: TensorBoard event files hold what stats.jsonl holds (and the sample grids),
resumed runs continue them; the tick's progress bar shows only on a terminal; the FD metric."""

import io
import json
import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch

import dnnlib
from metrics.fid import FIDError
from tests.helpers import tiny_net
from torch_utils import training_stats
from training.dataset import ImageFolderDataset
from sampling.images import save_image_grid
from training.monitor import Monitor, SampleFD
from training.testdata import make_dataset

def event_accumulator(run_dir):
    pytest.importorskip('tensorboard', reason='TensorBoard logs need the optional tensorboard package (pip install tensorboard)')
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run_dir), size_guidance={'scalars': 0, 'images': 0})
    acc.Reload()
    return acc

def tick_stats(collector, loss, kimg):
    training_stats.report('Test/loss', loss)
    training_stats.report0('Test/kimg', kimg)
    collector.update()
    return json.loads(json.dumps(collector.as_dict())) # as the training loop writes them to stats.jsonl

@pytest.fixture(scope='module')
def digits_path(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp('m') / 'data', n=64, res=8, channels=1, structured=True)

@pytest.fixture(scope='module')
def digits(digits_path):
    return ImageFolderDataset(digits_path, use_labels=True)

#----------------------------------------------------------------------------

def test_tensorboard_holds_stats_and_grids_and_resume_continues(tmp_path):
    event_accumulator(tmp_path) # skips without tensorboard
    collector = training_stats.Collector(regex='Test/.*', keep_previous=False)
    grids = {1000: np.random.RandomState(0).randint(0, 256, [4, 8, 8, 1], dtype=np.uint8),
             4000: np.random.RandomState(1).randint(0, 256, [4, 8, 8, 3], dtype=np.uint8)}
    written = {}
    monitor = Monitor(str(tmp_path), start_nimg=0, kimg_per_tick=1)
    for nimg, loss in [(1000, [1.0, 2.0]), (2000, [3.0]), (3000, [4.0, 8.0])]:
        written[nimg] = tick_stats(collector, loss, nimg / 1000)
        monitor.log_stats(written[nimg], nimg)
        if nimg in grids:
            save_image_grid(grids[nimg], tmp_path / f'samples-{nimg}.png', scale=2, gap=1)
            monitor.log_grid(tmp_path / f'samples-{nimg}.png', nimg)
    monitor.close()

    # Resumed from the state at 2000 images, into the same folder: what came after 2000 is replaced.
    monitor = Monitor(str(tmp_path), start_nimg=2000, kimg_per_tick=1)
    for nimg, loss in [(3000, [5.0]), (4000, [6.0, 7.0])]:
        written[nimg] = tick_stats(collector, loss, nimg / 1000)
        monitor.log_stats(written[nimg], nimg)
    save_image_grid(grids[4000], tmp_path / 'samples-4000.png')
    monitor.log_grid(tmp_path / 'samples-4000.png', 4000)
    monitor.close()

    acc = event_accumulator(tmp_path)
    for name in ['Test/loss', 'Test/kimg']:
        events = acc.Scalars(name)
        assert [e.step for e in events] == [1000, 2000, 3000, 4000]
        assert [e.value for e in events] == pytest.approx([written[e.step][name]['mean'] for e in events], rel=1e-6)
    assert acc.Scalars('Test/loss')[2].value == 5.0 # the resumed run's value
    images = acc.Images('Samples')
    assert [e.step for e in images] == [1000, 4000]
    for event, scale, gap in zip(images, [2, 1], [1, 0]):
        shown = np.array(PIL.Image.open(io.BytesIO(event.encoded_image_string)).convert('RGB'))
        expected = np.array(PIL.Image.open(tmp_path / f'samples-{event.step}.png').convert('RGB'))
        assert shown.shape == (2 * (8 * scale + gap) - gap,) * 2 + (3,) and np.array_equal(shown, expected)

#----------------------------------------------------------------------------

class FakeTerminal(io.StringIO):
    def isatty(self):
        return True

@pytest.mark.parametrize('terminal', [False, True])
def test_progress_bar_only_on_a_terminal_and_never_in_the_log(terminal, tmp_path, monkeypatch):
    stream = FakeTerminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, 'stdout', stream)
    logger = dnnlib.util.Logger(str(tmp_path / 'log.txt'), file_mode='a') # as train.py: a copy of stdout goes to log.txt
    try:
        monitor = Monitor(str(tmp_path), start_nimg=5000, kimg_per_tick=0.064)
        print('status line')
        start = stream.tell()
        for nimg in range(5008, 5064, 8):
            monitor.step(nimg, 5000)
        if terminal:
            assert monitor.bar.n == pytest.approx(0.056)
        assert monitor.tick(None, 1, done=False) == '' # no metric
        monitor.close()
    finally:
        logger.close()
    bar = stream.getvalue()[start:]
    assert ('kimg' in bar and 'tick' in bar) if terminal else bar == ''
    assert 'kimg' not in (tmp_path / 'log.txt').read_text() and 'status line' in (tmp_path / 'log.txt').read_text()

#----------------------------------------------------------------------------

def test_fd_lower_for_data_than_for_noise_and_deterministic(digits):
    metric = SampleFD(digits, 32, batch=16)
    assert metric.name == 'Metrics/fd_standin'
    data = [torch.as_tensor(np.stack([digits[i][0] for i in range(k, k + 16)])) for k in range(0, 64, 16)]
    noise = [torch.randint(0, 256, [16, 1, 8, 8], dtype=torch.uint8, generator=torch.Generator().manual_seed(k)) for k in range(4)]
    fd_data, fd_noise = metric.fd(data), metric.fd(noise)
    assert 0 <= fd_data and 2 * fd_data < fd_noise, (fd_data, fd_noise)

    # The EMA samples come from fixed seeds: the same network gives the same number, however batched.
    net = tiny_net()
    fd = metric(net)
    assert np.isfinite(fd) and fd == metric(net) and SampleFD(digits, 32, batch=5)(net) == pytest.approx(fd, rel=1e-6)
    assert metric(tiny_net(seed=1)) != pytest.approx(fd, rel=1e-3) # and another network another

def test_metric_every_n_ticks_in_stats_and_tensorboard(digits, tmp_path):
    event_accumulator(tmp_path) # skips without tensorboard
    fresh = training_stats.Collector(regex='Metrics/.*', keep_previous=False)
    collector = training_stats.Collector(regex='Metrics/.*') # as the loop's: stale values stay in stats.jsonl
    monitor = Monitor(str(tmp_path), start_nimg=0, kimg_per_tick=1, dataset_obj=digits, metric_every=2, metric_images=16, batch=16)
    net = tiny_net()
    reported = []
    fields = []
    for tick in range(4):
        fields.append(monitor.tick(net, tick, done=(tick == 3)))
        fresh.update()
        collector.update()
        reported.append(fresh.num('Metrics/fd_standin'))
        monitor.log_stats(collector.as_dict(), tick * 1000)
    monitor.close()
    assert reported == [1, 0, 1, 1] # ticks 0 and 2, and the last one
    events = event_accumulator(tmp_path).Scalars('Metrics/fd_standin')
    assert [e.step for e in events] == [0, 2000, 3000] # not repeated at tick 1
    assert events[0].value == pytest.approx(SampleFD(digits, 16)(net), rel=1e-6)
    assert fields[0] == f'fd_standin {events[0].value:<8.4g}' and fields[1] == ''  # for the status line

TWO_RANKS = """
import json, sys
from torch_utils import distributed as dist
from training.dataset import ImageFolderDataset
from training.monitor import SampleFD
from tests.helpers import tiny_net
dist.init()
fd = SampleFD(ImageFolderDataset(sys.argv[1], use_labels=True), 16, batch=4)(tiny_net())
if dist.get_rank() == 0:
    json.dump(fd, open(sys.argv[2], 'w'))
"""

@pytest.mark.slow
def test_fd_split_over_two_ranks_is_the_same(digits, digits_path, tmp_path):
    # Each rank samples and embeds every other seed and training image; the feature sums are added up.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    (tmp_path / 'two_ranks.py').write_text(TWO_RANKS)
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', str(tmp_path / 'two_ranks.py'),
           digits_path, str(tmp_path / 'fd.json')]
    proc = subprocess.run(cmd, cwd=root, env=dict(os.environ, PYTHONPATH=root), text=True, capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.load(open(tmp_path / 'fd.json')) == pytest.approx(SampleFD(digits, 16, batch=4)(tiny_net()), rel=1e-6)

def test_without_tensorboard_says_how_to_get_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, 'torch.utils.tensorboard', None) # import fails as when the package is absent
    monitor = Monitor(str(tmp_path), start_nimg=0, kimg_per_tick=1)
    monitor.log_stats({'Test/loss': dict(num=1, mean=1.0, std=0.0)}, 1000)
    monitor.close()
    assert 'TensorBoard logs: off (pip install tensorboard' in capsys.readouterr().out and os.listdir(tmp_path) == []

#----------------------------------------------------------------------------
# Wired into the training loop (train.py --metric-every/--metric-images).

def test_train_py_logs_metric_and_tensorboard(digits_path, tmp_path):
    from tests.helpers import TINY, only_run_dir, run_train as run
    proc = run(['--outdir', str(tmp_path), '--data', digits_path, '--cond=1', '--aot=16', '--duration=0.000064', '--snap=2',
                '--metric-every=2', '--metric-images=8'] + TINY)
    run_dir = only_run_dir(tmp_path)
    stats = [json.loads(line) for line in open(os.path.join(run_dir, 'stats.jsonl'))]
    assert all(np.isfinite(s['Metrics/fd_standin']['mean']) for s in stats) and 'fd_standin' in proc.stdout
    assert 'NOT comparable to published FID' in proc.stdout and 'kimg |' not in proc.stdout + proc.stderr # no bar off a terminal
    acc = event_accumulator(run_dir)
    assert [round(s['Progress/kimg']['mean'] * 1000) for s in stats] == [16, 48, 64] # ticks 0, 1, 2 (the last)
    assert [e.step for e in acc.Scalars('Loss/loss')] == [16, 48, 64]
    assert [e.value for e in acc.Scalars('Loss/loss')] == pytest.approx([s['Loss/loss']['mean'] for s in stats], rel=1e-6)
    assert [e.step for e in acc.Scalars('Metrics/fd_standin')] == [16, 64] # every 2 ticks, and the last
    assert [e.step for e in acc.Images('Samples')] == [16, 64] # the snapshots' grids

def test_unreadable_detector_is_a_one_line_error_before_any_file(digits, tmp_path):
    with pytest.raises(FIDError, match=r"the FD metric's detector \(nope.pkl\): File not found: nope.pkl"):
        Monitor(str(tmp_path), start_nimg=0, kimg_per_tick=1, dataset_obj=digits, metric_every=1, metric_detector='nope.pkl')
    assert os.listdir(tmp_path) == []
