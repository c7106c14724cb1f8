"""train.py end to end on CPU: every precond, AOT on/off, augmentation on/off, gradient
accumulation, a 2-process torchrun, exact resume, and the refusal of bad input."""

import json
import math
import os
import pickle
import signal
import subprocess
import sys

from unittest import mock

import numpy as np
import pytest
import scipy.optimize
import torch

import dnnlib
from tests.helpers import ROOT, TINY, all_tensors, assert_same_weights, final_losses, only_run_dir, run_train as run
from training.run_dir import latest_state
from training import network_io, training_loop
from training.testdata import make_dataset

@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp('d') / 'data', n=64, res=8, num_classes=4)

@pytest.mark.slow
@pytest.mark.parametrize('arch,precond,cond,aot,augment,extra', [
    ('ddpmpp', 'edm', 1, 32, 0.12, []),
    ('ddpmpp', 'edm', 0, 0, 0, []),                       # plain EDM, no augmentation
    ('ncsnpp', 'vp', 1, 16, 0, ['--fp16=1']),             # --augment 0 with AOT (crashed in EDM-AOT); fp16 stays fp32 on CPU
    ('ncsnpp', 've', 0, 32, 0.12, []),                    # VE takes the paired noise too
    ('adm', 'edm', 1, 24, 0.12, ['--batch-gpu=8', '--workers=1']), # accumulation, pool of 3 slices, background worker
])
def test_train_configs(tmp_path, data, arch, precond, cond, aot, augment, extra):
    run(['--outdir', str(tmp_path), '--data', data, f'--arch={arch}', f'--precond={precond}', f'--cond={cond}',
         f'--aot={aot}', f'--augment={augment}', '--duration=0.000064'] + TINY + extra)
    run_dir = only_run_dir(tmp_path)
    dtype = 'fp16' if '--fp16=1' in extra else 'fp32'
    assert os.path.basename(run_dir) == f'00000-data-{"cond" if cond else "uncond"}-{arch}-{precond}-gpus1-batch16-{dtype}'
    losses = final_losses(run_dir)
    assert losses and all(math.isfinite(x) for x in losses)
    with open(os.path.join(run_dir, 'training_options.json')) as f:
        assert json.load(f)['aot_pool'] == aot
    for ext in ['pkl', 'safetensors']:
        net = network_io.load_network(os.path.join(run_dir, f'network-snapshot-000000.{ext}'), verbose=False)
        assert net.label_dim == (4 if cond else 0) and net.img_resolution == 8
    assert os.path.isfile(os.path.join(run_dir, 'samples-000000.png'))
    log = open(os.path.join(run_dir, 'log.txt')).read()
    assert 'aot_wait' in log and 'Exiting...' in log

@pytest.mark.slow
def test_torchrun_two_ranks(tmp_path, data):
    proc = run(['--outdir', str(tmp_path), '--data', data, '--cond=1', '--aot=16', '--duration=0.000064'] + TINY, torchrun=2)
    assert 'weights identical on all 2 ranks; each rank trained on its own images.' in proc.stdout
    assert 'gpus2-batch16' in only_run_dir(tmp_path)

def state_tensors(path):
    state = torch.load(path, weights_only=True)
    return state['cur_nimg'], {**{f'net.{k}': v for k, v in state['net'].items()}, **{f'ema.{k}': v for k, v in state['ema'].items()}}

@pytest.fixture(scope='module')
def resume_runs(tmp_path_factory, data):
    # Interrupted after 4 slices of 16, in the middle of a pool of 3 slices (--aot=48).
    root = tmp_path_factory.mktemp('resume')
    common = ['--data', data, '--cond=1', '--aot=48', '--dump=1', '--nosubdir'] + TINY + ['--workers=1'] # the CPU's default
    if torch.cuda.is_available(): # CUDA's default kernels are not bitwise reproducible (docs/training.md)
        common.append('--deterministic')
    run(['--outdir', str(root / 'full'), '--duration=0.000128'] + common)
    run(['--outdir', str(root / 'part'), '--duration=0.000064'] + common)
    # A plain re-run in the same directory picks up the latest state.
    proc = run(['--outdir', str(root / 'part'), '--duration=0.000128'] + common)
    assert 'resuming from it' in proc.stdout
    return root

@pytest.mark.slow
def test_resume_equals_uninterrupted(resume_runs):
    nimg_a, a = state_tensors(resume_runs / 'full' / 'training-state-000000.pt')
    nimg_b, b = state_tensors(resume_runs / 'part' / 'training-state-000000.pt')
    assert nimg_a == nimg_b == 128
    assert_same_weights(a, b)

@pytest.mark.slow
def test_resume_continues(resume_runs):
    # A run that started over would log kimg 0.016 again and could still end equal to the full run:
    # the resumed ticks must go on from 0.064, and Adam must have counted all 8 steps.
    with open(resume_runs / 'part' / 'stats.jsonl') as f:
        ticks = [json.loads(line) for line in f]
    assert [round(t['Progress/kimg']['mean'], 3) for t in ticks] == [0.016, 0.048, 0.064, 0.096, 0.128]
    assert [t['Progress/tick']['mean'] for t in ticks] == [0, 1, 2, 3, 4]
    state = torch.load(resume_runs / 'part' / 'training-state-000000.pt', weights_only=True)
    assert {int(s['step']) for s in state['optimizer_state']['state'].values()} == {8}
    assert (state['batch_size'], state['aot_pool'], state['world_size']) == (16, 48, 1)

@pytest.mark.slow
def test_resume_with_other_data_says_what_each_has(resume_runs, tmp_path):
    # The run trained on 8x8 RGB images with 4 classes; other data of 16x16 grey images without labels.
    other = make_dataset(tmp_path / 'other', n=16, res=16, channels=1, labels=False)
    line = expect_cli_error(tmp_path, ['--resume', str(resume_runs / 'full'), '--data', other], 'these differ: ')
    assert ': it trained on 8x8x3 images, 4 classes, the new data has 16x16x1 images, no labels)' in line, line

@pytest.mark.slow
def test_resume_refuses_every_difference_at_once(resume_runs, data, tmp_path):
    # expect_cli_error adds --outdir (another one) and --duration=0.000016 (shorter than the run's)
    line = expect_cli_error(tmp_path, ['--resume', str(resume_runs / 'full'), '--data', data, '--aot=32', '--batch=48', '--seed=1', '--cbase=8'],
                            'these differ: ')
    for difference in ['--aot=32 (the run has 48)', '--batch=48 (the run has 16)', '--seed=1 (the run has 0)', '--duration=1.6e-05 (the run has 0.000128)',
                       f'--outdir={tmp_path / "out"} (the run has {resume_runs / "full"})']:
        assert difference in line
    assert '--cbase' not in line and '--data' not in line # given, and the same as the run's

@pytest.mark.slow
def test_resume_by_folder_alone_and_longer(resume_runs, tmp_path):
    # The run's own options, its folder, and a longer --duration: the one change allowed.
    result = cli(['--resume', str(resume_runs / 'full'), '--duration=0.000160', '--dry-run'])
    assert result.exit_code == 0, result.output[-2000:]
    c = json.loads(result.output.split('Training options:\n', 1)[1].split('\nOutput directory:', 1)[0])
    assert c['total_kimg'] == pytest.approx(0.16) and c['aot_pool'] == 48 and c['network_kwargs']['model_channels'] == 8
    assert c['resume_state_dump'] == str(resume_runs / 'full' / 'training-state-000000.pt')
    assert f'Output directory:        {resume_runs / "full"}\n' in result.output

def test_error_nothing_to_train_on(tmp_path):
    result = cli(['--duration=0.000016'])
    assert result.exit_code == 1 and result.output.strip().splitlines()[-1] == \
        'Error: --data and --outdir are needed to start a run; or continue one with --resume=RUN_DIR', result.output[-2000:]

def old_run_folder(resume_runs, path, **edit):
    """A copy of the full run's final state in a folder as older versions left it: no recorded options."""
    path.mkdir()
    state = torch.load(resume_runs / 'full' / 'training-state-000000.pt', weights_only=True)
    torch.save({k: v for k, v in state.items() if k not in edit or edit[k] is not None} | {k: v for k, v in edit.items() if v is not None},
               path / 'training-state-000000.pt')
    options = json.loads((resume_runs / 'full' / 'training_options.json').read_text())
    (path / 'training_options.json').write_text(json.dumps({k: v for k, v in options.items() if k != 'command_line'}))
    return path

@pytest.mark.slow
@pytest.mark.parametrize('flag,value', [('--aot', '32'), ('--batch', '48'), ('--seed', '1')])
def test_old_run_folder_refuses_other_pools(resume_runs, data, tmp_path, flag, value):
    old = old_run_folder(resume_runs, tmp_path / 'old')
    expect_cli_error(tmp_path, ['--resume', str(old)], 'records no options') # cannot be continued from its folder alone
    args = ['--data', data, '--cond=1', '--aot=48', '--resume', str(old), '--dry-run'] + TINY + [f'{flag}={value}']
    expect_cli_error(tmp_path, args, f'the interrupted run had {flag}=')

@pytest.mark.slow
@pytest.mark.parametrize('recorded', [True, False]) # recorded in the state, or read off the tensors (older states)
def test_error_resume_other_resolution(resume_runs, tmp_path, recorded):
    edit = {} if recorded else dict(img_resolution=None, img_channels=None, label_dim=None)
    old = old_run_folder(resume_runs, tmp_path / 'old', **edit)
    data16 = make_dataset(tmp_path / 'data16', n=8, res=16)
    line = expect_cli_error(tmp_path, ['--data', data16, '--cond=1', '--aot=48', '--resume', str(old), '--dry-run'] + TINY, 'does not fit')
    assert 'resolution 8x8 in --resume=' in line and '16x16 in --data' in line

def test_latest_state_by_content(tmp_path):
    # The rolling state wins only when it holds more training, whatever the file times say.
    torch.save(dict(cur_nimg=128), tmp_path / 'training-state-000000.pt')
    torch.save(dict(cur_nimg=64), tmp_path / 'training-state-latest.pt')
    assert latest_state(tmp_path) == str(tmp_path / 'training-state-000000.pt')
    torch.save(dict(cur_nimg=144), tmp_path / 'training-state-latest.pt')
    os.utime(tmp_path / 'training-state-latest.pt', (0, 0))
    assert latest_state(tmp_path) == str(tmp_path / 'training-state-latest.pt')
    (tmp_path / 'training-state-000000.pt').unlink()
    assert latest_state(tmp_path) == str(tmp_path / 'training-state-latest.pt')

@pytest.mark.slow
def test_sigint_then_resume_by_folder_equals_uninterrupted(resume_runs, data, tmp_path):
    # Ctrl-C once training runs: the state is saved, exit status 75; --resume=RUN_DIR alone then
    # ends in the same folder with every tensor and the final snapshot of the uninterrupted run.
    args = ['--outdir', str(tmp_path), '--data', data, '--cond=1', '--aot=48', '--dump=1', '--duration=0.000128'] + TINY + ['--workers=1']
    proc = subprocess.Popen([sys.executable, 'train.py'] + args + (['--deterministic'] if torch.cuda.is_available() else []), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dict(os.environ, PYTHONUNBUFFERED='1'))
    output = []
    for line in proc.stdout:
        output.append(line)
        if line.startswith('Training for'):
            proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=600) == 75, ''.join(output[-30:])
    run_dir = only_run_dir(tmp_path)
    assert f'Exit status 75. To continue: train.py --resume={run_dir}' in output[-1]
    assert torch.load(os.path.join(run_dir, 'training-state-latest.pt'), weights_only=True)['cur_nimg'] < 128 # stopped early
    run(['--resume', run_dir])
    assert only_run_dir(tmp_path) == run_dir
    full = str(resume_runs / 'full')
    a, b = (torch.load(os.path.join(d, 'training-state-000000.pt'), weights_only=True) for d in [run_dir, full])
    assert a['cur_nimg'] == b['cur_nimg'] == 128
    assert_same_weights(all_tensors(a), all_tensors(b))
    snapshots = [network_io.load_network(os.path.join(d, 'network-snapshot-000000.pkl'), verbose=False).state_dict() for d in [run_dir, full]]
    assert_same_weights(*snapshots)
    losses = final_losses(run_dir)
    assert len(losses) == len(final_losses(full)) and losses[2:] == final_losses(full)[2:] # one log; tick 1 was split by the stop

#----------------------------------------------------------------------------
# Bad input: one line, non-zero exit, no run directory left behind.

def expect_error(tmp_path, args, message, torchrun=0):
    outdir = tmp_path / 'out'
    proc = run(['--outdir', str(outdir), '--duration=0.000016'] + args, torchrun=torchrun, check=False)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith('Error:')]
    assert errors and message in errors[0], proc.stderr[-2000:]
    if not torchrun: # torchrun adds its own report of the failed child
        assert 'Traceback' not in proc.stderr
    assert not outdir.exists() or not any(outdir.iterdir())

@pytest.mark.slow
def test_error_missing_dataset(tmp_path):
    # A real process: exit status, stderr and no traceback as a user sees them.
    expect_error(tmp_path, ['--data', str(tmp_path / 'nope.zip')] + TINY, 'nope.zip')

def expect_cli_error(tmp_path, args, message):
    """The same checks in this process: an Error line (click's, not a traceback) and nothing written."""
    outdir = tmp_path / 'out'
    result = cli(['--outdir', str(outdir), '--duration=0.000016'] + args) # one step should the check be missing
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit), result.output[-2000:]
    errors = [line for line in result.output.splitlines() if line.startswith('Error:')]
    assert len(errors) == 1 and message in errors[0], result.output[-2000:]
    assert not outdir.exists() or not any(outdir.iterdir())
    return errors[0]

def test_error_corrupt_dataset(tmp_path):
    bad = tmp_path / 'bad.zip'
    bad.write_bytes(b'this is not a zip file')
    expect_cli_error(tmp_path, ['--data', str(bad)] + TINY, 'bad.zip')

def test_error_cond_without_labels(tmp_path):
    data = make_dataset(tmp_path / 'nolabels', n=8, labels=False)
    expect_cli_error(tmp_path, ['--data', data, '--cond=1'] + TINY, '--cond=1 requires labels')

def test_error_pool_not_multiple_of_batch_gpu(tmp_path, data):
    expect_cli_error(tmp_path, ['--data', data, '--aot=20', '--batch-gpu=8'] + TINY, '--aot=20 is not a multiple of the per-GPU batch 8')

def test_error_batch_not_multiple_of_batch_gpu(tmp_path, data):
    expect_cli_error(tmp_path, ['--data', data, '--aot=0', '--batch-gpu=6'] + TINY, 'not a multiple of --batch-gpu=6')

def test_error_resolution_not_power_of_two(tmp_path):
    data = make_dataset(tmp_path / 'res12', n=8, res=12)
    expect_cli_error(tmp_path, ['--data', data] + TINY, 'power of two')

def test_error_lap_missing(tmp_path, data, monkeypatch):
    monkeypatch.setitem(sys.modules, 'lap', None) # import lap raises ImportError
    expect_cli_error(tmp_path, ['--data', data, '--aot=16', '--aot-solver=lap'] + TINY, 'pip install lap')

@pytest.mark.slow
def test_pool_placement_leaves_training_alone(data, tmp_path):
    # Pools are the same in threads and in worker processes, and starting workers must not move the
    # trainer's random streams (sigma per image): both placements end with the same weights.
    states = []
    for workers in [0, 1]:
        outdir = tmp_path / f'workers{workers}'
        run(['--outdir', str(outdir), '--data', data, '--cond=1', '--aot=48', '--augment=0.12', '--duration=0.000064', '--dump=1']
            + TINY + [f'--workers={workers}'])
        states.append(torch.load(latest_state(only_run_dir(outdir)), weights_only=True))
    assert_same_weights(all_tensors(states[0]), all_tensors(states[1]))

@pytest.mark.slow
def test_snap_and_dump_zero_save_nothing(data, tmp_path):
    # --snap=0 and --dump=0 mean never (not even at the end), for runs that only time or check
    # training; the statistics are still written.
    run(['--outdir', str(tmp_path), '--data', data, '--duration=0.000064', '--snap=0', '--dump=0', '--dump-minutes=0'] + TINY)
    run_dir = only_run_dir(tmp_path)
    saved = [n for n in os.listdir(run_dir) if n.startswith(('network-snapshot-', 'training-state-', 'samples-'))]
    assert saved == [] and len(final_losses(run_dir)) >= 2
    help_text = ' '.join(run(['--help']).stdout.split()) # click wraps the lines
    assert 'save snapshots (and at the end), 0 = never' in help_text and 'dump state (and at the end), 0 = never' in help_text

@pytest.mark.slow
def test_sigterm_to_every_process_saves_the_state(data, tmp_path):
    # A scheduler's SIGTERM reaches the pool worker processes too: they must keep serving pools
    # until the trainer has stopped and saved, and then end (no hang at exit). Sent as training
    # starts, it reaches workers still starting up (spawned: importing torch), not yet in their init.
    args = ['--outdir', str(tmp_path), '--data', data, '--cond=1', '--aot=48', '--duration=0.001'] + TINY + ['--workers=2']
    proc = subprocess.Popen([sys.executable, 'train.py'] + args, cwd=ROOT, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dict(os.environ, PYTHONUNBUFFERED='1'))
    output = []
    for line in proc.stdout:
        output.append(line)
        if line.startswith('Training for'):
            os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=300) == 75, ''.join(output[-30:])
    assert 'Stopped by SIGTERM' in output[-1]
    assert torch.load(os.path.join(only_run_dir(tmp_path), 'training-state-latest.pt'), weights_only=True)['cur_nimg'] < 1000

def test_error_unreadable_resume_and_transfer(tmp_path, data):
    state = tmp_path / 'training-state-000001.pt'
    state.write_bytes(b'garbage')
    expect_cli_error(tmp_path, ['--data', data, '--resume', str(state)] + TINY, 'cannot read training state')
    torch.save(dict(cur_nimg=0), tmp_path / 'training-state-000002.pt') # readable, but no training state
    expect_cli_error(tmp_path, ['--data', data, '--resume', str(tmp_path / 'training-state-000002.pt')] + TINY, 'not a training state')
    expect_cli_error(tmp_path, ['--data', data, '--transfer', str(tmp_path / 'missing.pkl')] + TINY, 'missing.pkl')
    corrupt = tmp_path / 'corrupt.pkl'
    corrupt.write_bytes(b'\x80\x04garbage')
    expect_cli_error(tmp_path, ['--data', data, '--transfer', str(corrupt)] + TINY, 'cannot load the network')
    expect_cli_error(tmp_path, ['--data', data, '--transfer', str(corrupt), '--resume', str(state)] + TINY, 'cannot be specified at the same time')

def tiny_snapshot(tmp_path, name, data, extra=()):
    """A snapshot pickle of the network train.py builds for data with these options."""
    result = cli(['--outdir', str(tmp_path / 'o'), '--data', data, '--cond=1', '--dry-run'] + TINY + list(extra))
    c = json.loads(result.output.split('Training options:\n', 1)[1].split('\nOutput directory:', 1)[0])
    dataset = dnnlib.util.construct_class_by_name(**c['dataset_kwargs'])
    net = dnnlib.util.construct_class_by_name(**c['network_kwargs'], img_resolution=dataset.resolution,
                                              img_channels=dataset.num_channels, label_dim=dataset.label_dim)
    with open(tmp_path / name, 'wb') as f:
        pickle.dump(dict(ema=net), f)
    return str(tmp_path / name)

@pytest.mark.parametrize('what,snapshot_data,extra,message', [
    ('resolution', dict(res=16), [], 'resolution 16x16 in --transfer='),
    ('classes', dict(num_classes=10), [], 'classes 8 in --transfer='), # 8 images: labels 0-7
    ('architecture', {}, ['--cbase=16'], 'architecture: model_channels=16'),
    ('architecture', {}, ['--arch=adm'], 'architecture: model_type="DhariwalUNet"'),
])
def test_error_transfer_does_not_fit(tmp_path, data, what, snapshot_data, extra, message):
    # Checked before the run directory exists, so --dry-run reports it too.
    source = make_dataset(tmp_path / 'src', n=8, **snapshot_data) if snapshot_data else data
    snapshot = tiny_snapshot(tmp_path, 'snap.pkl', source, extra)
    line = expect_cli_error(tmp_path, ['--data', data, '--cond=1', '--transfer', snapshot, '--dry-run'] + TINY, message)
    assert line.startswith(f'Error: --transfer={snapshot} does not fit this run: {what}')

def test_transfer_that_fits_passes_the_check(tmp_path, data):
    snapshot = tiny_snapshot(tmp_path, 'snap.pkl', data)
    result = cli(['--outdir', str(tmp_path / 'out'), '--data', data, '--cond=1', '--transfer', snapshot, '--dry-run'] + TINY)
    assert result.exit_code == 0, result.output

@pytest.mark.slow
def test_resume_on_another_gpu_count_is_noted(resume_runs, data, tmp_path):
    # Allowed (clusters change), but the pools cannot be the same: said, not silent.
    state = torch.load(resume_runs / 'full' / 'training-state-000000.pt', weights_only=True)
    state['world_size'] = 2
    torch.save(state, tmp_path / 'training-state-000000.pt')
    result = cli(['--outdir', str(tmp_path / 'out'), '--data', data, '--cond=1', '--aot=48', '--resume', str(tmp_path / 'training-state-000000.pt'), '--dry-run'] + TINY)
    assert result.exit_code == 0 and 'Note: the interrupted run had 2 GPU(s), this one 1' in result.output, result.output[-2000:]

@pytest.mark.slow
def test_error_resume_other_network(resume_runs, data, tmp_path):
    old = old_run_folder(resume_runs, tmp_path / 'old')
    expect_cli_error(tmp_path, ['--data', data, '--cond=1', '--aot=48', '--resume', str(old), '--dry-run'] + TINY + ['--cbase=16'],
                     'does not fit this run: architecture')

def test_warning_pool_larger_than_dataset(tmp_path, data):
    result = cli(['--outdir', str(tmp_path / 'out'), '--data', data, '--aot=128', '--dry-run'] + TINY)
    assert result.exit_code == 0 and 'Warning: --aot=128 is larger than the dataset (64 images)' in result.output

def test_error_resume_folder_that_does_not_exist(tmp_path):
    # A typo in --resume: said as such (not "records no options"), with the run folders beside it.
    (tmp_path / 'runs' / '00000-digits').mkdir(parents=True)
    line = expect_cli_error(tmp_path, ['--resume', str(tmp_path / 'runs' / '00000-digit')], 'no such run folder or state file')
    assert line.endswith(f'check the path: {tmp_path / "runs"} holds 00000-digits'), line

def test_pool_larger_than_dataset_suggests_a_pool_that_is_accepted(tmp_path):
    # 200 images at --batch=64: 200 would be refused (not a multiple of 64); 192 is the largest that is not.
    data = make_dataset(tmp_path / 'data200', n=200, res=8)
    result = cli(['--outdir', str(tmp_path / 'out'), '--data', data, '--aot=256', '--dry-run'] + TINY + ['--batch=64'])
    assert result.exit_code == 0 and 'Use --aot=192 or less for distinct images' in result.output, result.output[-2000:]
    assert cli(['--outdir', str(tmp_path / 'out'), '--data', data, '--aot=192', '--dry-run'] + TINY + ['--batch=64']).exit_code == 0
    small = make_dataset(tmp_path / 'data40', n=40, res=8)
    result = cli(['--outdir', str(tmp_path / 'out'), '--data', small, '--aot=64', '--dry-run'] + TINY + ['--batch=64'])
    assert result.exit_code == 0 and 'No pool of distinct images is a multiple of the per-GPU batch 64' in result.output, result.output[-2000:]

@pytest.mark.parametrize('solver,workers', [('scipy', 1), ('knn', 0)])
def test_workers_auto_on_cuda_keeps_knn_pools_in_the_training_process(tmp_path, data, monkeypatch, solver, workers):
    # On a GPU --workers auto means worker processes (here 1: two cores), but knn pools are built in
    # the training process, where their distance passes run on the GPU.
    from torch_utils import distributed as dist
    monkeypatch.setattr(dist, 'use_cuda', lambda: True)
    monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: {0, 1}, raising=False)
    args = [arg for arg in TINY if not arg.startswith('--workers')]
    result = cli(['--outdir', str(tmp_path / 'out'), '--data', data, '--aot=16', f'--aot-solver={solver}', '--dry-run'] + args)
    assert result.exit_code == 0, result.output
    c = json.loads(result.output.split('Training options:\n', 1)[1].split('\nOutput directory:', 1)[0])
    assert c['data_loader_kwargs']['num_workers'] == workers

def test_aot_scope_is_gone(tmp_path, data):
    # Removed (docs/aot-scale.md): click's own error, nothing written.
    result = cli(['--outdir', str(tmp_path / 'out'), '--data', data, '--aot-scope=global', '--dry-run'] + TINY)
    assert result.exit_code == 2 and "No such option '--aot-scope'" in result.output, result.output
    assert not (tmp_path / 'out').exists()

@pytest.mark.slow
def test_error_batch_not_divisible_by_world(tmp_path, data):
    expect_error(tmp_path, ['--data', data, '--aot=0'] + TINY + ['--batch=15'], 'not divisible by the number of GPUs (2)', torchrun=2)

#----------------------------------------------------------------------------
# In-process runs: train.py's own configuration (from --dry-run), the loop called here with a loss
# that records what it is fed. They guard what files and finite losses cannot show.

def cli(args):
    """train.py in this process (no interpreter start-up): click's result, with output and exit_code."""
    from click.testing import CliRunner
    import train
    with mock.patch.object(torch.multiprocessing, 'set_start_method'): # keep pytest's start method
        return CliRunner().invoke(train.main, args)

class RecordingLoss:
    """The run's own loss, recording its inputs, the weights it sees at the first call, and the
    dtypes of the network's layer outputs."""
    calls = []
    first_weights = None
    dtypes = set()

    def __init__(self, inner):
        self.inner = dnnlib.util.construct_class_by_name(**inner)

    def __call__(self, net, images, labels=None, noise=None, augment_labels=None):
        if not RecordingLoss.calls:
            RecordingLoss.first_weights = {k: v.detach().clone() for k, v in net.state_dict().items()}
        RecordingLoss.calls.append(dict(images=images.detach().cpu(), labels=labels.detach().cpu(), noise=noise.detach().cpu()))
        hooks = [m.register_forward_hook(lambda m, i, out: RecordingLoss.dtypes.add(out.dtype) if isinstance(out, torch.Tensor) else None)
                 for m in net.modules()]
        try:
            return self.inner(net=net, images=images, labels=labels, noise=noise, augment_labels=augment_labels)
        finally:
            for hook in hooks:
                hook.remove()

def train_in_process(args, run_dir, **loop_kwargs):
    """Train as train.py would with these options; returns the config and the final state dump."""
    result = cli(args + ['--outdir', str(run_dir), '--dry-run', '--dump=1', '--workers=0'])
    assert result.exit_code == 0, result.output
    c = dnnlib.EasyDict(json.loads(result.output.split('Training options:\n', 1)[1].split('\nOutput directory:', 1)[0]))
    c.update(dict(run_dir=str(run_dir), snapshot_ticks=None, grid_images=0), **loop_kwargs) # loop_kwargs may override
    c.loss_kwargs = dict(class_name=f'{__name__}.RecordingLoss', inner=c.loss_kwargs)
    os.makedirs(run_dir, exist_ok=True)
    RecordingLoss.calls.clear()
    RecordingLoss.dtypes.clear()
    with torch.enable_grad(): # as in train.py's own process, whatever grad mode other tests left behind
        training_loop.training_loop(**c)
    return c, torch.load(latest_state(run_dir), weights_only=True), result.output

def fixed_input_loss(c, weights, data_dir):
    """EDM's weighted denoising loss of the network with these weights on fixed images, noise and sigmas."""
    dataset = dnnlib.util.construct_class_by_name(**c.dataset_kwargs)
    images = torch.tensor(np.stack([dataset[i][0] for i in range(16)]), dtype=torch.float32) / 127.5 - 1
    labels = torch.tensor(np.stack([dataset[i][1] for i in range(16)]))
    net = dnnlib.util.construct_class_by_name(**c.network_kwargs, img_resolution=dataset.resolution,
                                              img_channels=dataset.num_channels, label_dim=dataset.label_dim)
    net.load_state_dict(weights)
    gen = torch.Generator().manual_seed(1)
    sigma = torch.exp(torch.linspace(-2, 1, 16)).reshape(-1, 1, 1, 1)
    noise = torch.randn(images.shape, generator=gen)
    with torch.no_grad():
        denoised = net.eval()(images + noise * sigma, sigma, labels)
    return ((sigma ** 2 + 0.25) / (sigma * 0.5) ** 2 * (denoised - images) ** 2).mean().item()

LEARN_STEPS = 18 # --duration=0.000288 is 288.00000000000006 images in floats: must still stop at 18 x 16

@pytest.fixture(scope='module')
def learned(tmp_path_factory):
    root = tmp_path_factory.mktemp('learn')
    data_dir = make_dataset(root / 'data', n=64, res=8, structured=True)
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = True # torch's default; EDM's loop turns it off
    c, state, _ = train_in_process(['--data', data_dir, '--cond=1', '--aot=32', '--lr=0.003', '--lr-rampup=0.001', '--dropout=0', '--augment=0',
                                 '--duration=0.000288'] + TINY, root / 'run')
    return dnnlib.EasyDict(c=c, state=state, calls=list(RecordingLoss.calls), first=RecordingLoss.first_weights, data=data_dir,
                           dtypes=set(RecordingLoss.dtypes), fp16_reduction=torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction)

def test_loss_gets_pool_paired_noise(learned):
    # Each pool of 32 is two consecutive slices; its noise must be the optimal per-class pairing
    # of its (augmented) images, as scipy computes it here, not fresh or unpaired noise.
    calls = learned.calls
    assert len(calls) == LEARN_STEPS
    for k in range(LEARN_STEPS // 2):
        images, labels, noise = (torch.cat([calls[2 * k][key], calls[2 * k + 1][key]]).double() for key in ['images', 'labels', 'noise'])
        classes = labels.argmax(dim=1)
        paired = optimal = 0.0
        for cls in classes.unique():
            members = (classes == cls).nonzero().flatten()
            cost = torch.cdist(images[members].flatten(1), noise[members].flatten(1)).numpy()
            rows, cols = scipy.optimize.linear_sum_assignment(cost)
            optimal += cost[rows, cols].sum()
            paired += cost.trace()
        assert paired == pytest.approx(optimal, rel=1e-6), f'pool {k}: noise not AOT-paired ({paired} vs optimal {optimal})'

def test_model_learns(learned):
    before = fixed_input_loss(learned.c, learned.first, learned.data)
    after = fixed_input_loss(learned.c, learned.state['net'], learned.data)
    assert after < 0.95 * before, (before, after) # 1.179 -> 1.106 today; unchanged without optimizer steps
    moved = max((learned.state['net'][k] - v).abs().max().item() for k, v in learned.first.items())
    assert moved > 1e-3

def test_ema_follows_the_network(learned):
    # An EMA that never moved would make every snapshot the random initial network. The half-life
    # ramps up from 0 (EDM's ema_rampup_ratio): after 18 steps the EMA is near the trained weights.
    after = fixed_input_loss(learned.c, learned.state['ema'], learned.data)
    assert after < 0.97 * fixed_input_loss(learned.c, learned.first, learned.data)
    distance = lambda a, b: sum((a[k] - b[k]).abs().sum().item() for k in b)
    assert distance(learned.state['ema'], learned.state['net']) < 0.25 * distance(learned.first, learned.state['net'])

def test_default_numerics_stay_fp32(learned):
    assert learned.dtypes == {torch.float32}
    assert learned.fp16_reduction is False # EDM sets allow_fp16_reduced_precision_reduction = False

def test_bf16_runs_the_unet_in_bf16(learned, tmp_path):
    # --bf16 must not silently train in fp32: the U-Net's layers compute in bf16, the loss stays fp32.
    train_in_process(['--data', learned.data, '--cond=1', '--aot=16', '--bf16', '--duration=0.000032'] + TINY, tmp_path / 'run')
    assert torch.bfloat16 in RecordingLoss.dtypes and torch.float32 in RecordingLoss.dtypes

def test_rolling_state_on_the_clock(learned, tmp_path):
    # A clock that is always due: after every step (agreed one step later) the rolling state is
    # replaced; without numbered dumps it is all there is, one step behind the end.
    _, _, output = train_in_process(['--data', learned.data, '--cond=1', '--aot=16', '--duration=0.000064'] + TINY, tmp_path / 'run',
                                    state_dump_ticks=None, state_dump_minutes=1e-9)
    assert latest_state(tmp_path / 'run') == str(tmp_path / 'run' / 'training-state-latest.pt')
    assert torch.load(tmp_path / 'run' / 'training-state-latest.pt', weights_only=True)['cur_nimg'] == 48

@pytest.mark.parametrize('device', ['cpu'] + (['cuda'] if torch.cuda.is_available() else [])) # CUDA has fused foreach kernels
def test_foreach_updates_match_edm_bit_for_bit(device):
    from torch_utils import misc
    gen = torch.Generator().manual_seed(0)
    shapes = [[7], [3, 5], [4, 3, 3, 3], [1], [1000, 37]]
    def tensors(scale):
        return [(torch.randn(shape, generator=gen) * scale).to(device) for shape in shapes]
    def same_bits(a, b): # NaN payloads and signed zeros too
        return all(torch.equal(x.view(torch.int32), y.view(torch.int32)) for x, y in zip(a, b, strict=True))
    # Gradient cleaning: EDM's per-gradient nan_to_num(nan=0, posinf=1e5, neginf=-1e5).
    net = torch.nn.ParameterList([torch.nn.Parameter(t) for t in tensors(1)])
    grads = tensors(1e6) # finite values beyond 1e5 must stay
    grads[0][1], grads[1][2, 3], grads[2][0, 0, 0, 0], grads[2][1, 1, 1, 1], grads[3][0] = float('nan'), float('inf'), -float('inf'), -0.0, 3e38
    for p, g in zip(net, grads):
        p.grad = g.clone()
    assert bool(misc.nan_to_num_grads_(net))
    assert same_bits([p.grad for p in net], [torch.nan_to_num(g, nan=0.0, posinf=1e5, neginf=-1e5) for g in grads])
    assert not bool(misc.nan_to_num_grads_(net))
    # EMA: EDM's p_ema.copy_(p_net.detach().lerp(p_ema, ema_beta)), for betas across the range.
    for beta in [0.0, 1e-6, 0.3, 0.5, 0.7, 0.999, 1.0]:
        ema, target = tensors(1), tensors(1)
        expected = [p_net.lerp(p_ema, beta) for p_ema, p_net in zip(ema, target)]
        misc.ema_update_(ema, target, beta)
        assert same_bits(ema, expected), beta

def test_duration_float_rounding_does_not_overshoot(learned):
    assert learned.c.total_kimg * 1000 > LEARN_STEPS * 16 # the float really is above the last step
    assert learned.state['cur_nimg'] == LEARN_STEPS * 16

def perturbed_snapshot(c, state, path, scale=0.05):
    """A snapshot pickle whose EMA network holds the trained weights plus seeded noise: weights no
    fresh run starts from."""
    dataset = dnnlib.util.construct_class_by_name(**c.dataset_kwargs)
    net = dnnlib.util.construct_class_by_name(**c.network_kwargs, img_resolution=dataset.resolution,
                                              img_channels=dataset.num_channels, label_dim=dataset.label_dim)
    gen = torch.Generator().manual_seed(2)
    net.load_state_dict({k: v + scale * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v for k, v in state['net'].items()})
    with open(path, 'wb') as f:
        pickle.dump(dict(ema=net.eval(), loss_fn=None, augment_pipe=None, dataset_kwargs=dict(c.dataset_kwargs)), f)
    return net.state_dict()

def assert_near(weights, target, other):
    # closer to target than to other by far, tensor by tensor where they differ
    far = sum((target[k] - other[k]).abs().sum().item() for k in target)
    assert sum((weights[k] - target[k]).abs().sum().item() for k in target) < 0.01 * far

def test_transfer_loads_the_weights(learned, tmp_path):
    weights = perturbed_snapshot(learned.c, learned.state, tmp_path / 'snap.pkl')
    _, state, output = train_in_process(['--data', learned.data, '--cond=1', '--aot=16', '--dropout=0', '--augment=0', '--duration=0.000032', # two steps: no state dump at tick 0
                                         '--transfer', str(tmp_path / 'snap.pkl')] + TINY, tmp_path / 'run')
    assert 'unpickling runs code' in output
    assert_same_weights(RecordingLoss.first_weights, weights) # trained from the snapshot's weights ...
    assert_near(state['ema'], weights, learned.first)          # ... and the EMA starts there too

@pytest.mark.parametrize('precond', ['vp', 've', 'edm'])
def test_resume_and_transfer_every_precond(data, tmp_path, precond):
    # The weights are checked against the planned network, built on the meta device, where VP's
    # constructor once crashed (float() of a meta tensor). Two steps with a snapshot; resumed for a
    # third step; and a new run transferred from the snapshot.
    common = ['--data', data, '--cond=1', '--aot=16', '--augment=0', f'--precond={precond}'] + TINY
    _, state, _ = train_in_process(common + ['--duration=0.000032'], tmp_path / 'run', snapshot_ticks=1)
    dump, [snapshot, *_] = latest_state(tmp_path / 'run'), sorted((tmp_path / 'run').glob('network-snapshot-*.pkl'), reverse=True)
    _, resumed, _ = train_in_process(common + ['--duration=0.000048', '--resume', dump], tmp_path / 'resumed')
    assert_same_weights(RecordingLoss.first_weights, state['net'])
    assert resumed['cur_nimg'] == 48 and len(RecordingLoss.calls) == 1
    _, _, output = train_in_process(common + ['--duration=0.000032', '--transfer', str(snapshot)], tmp_path / 'transferred')
    assert 'unpickling runs code' in output
    assert_same_weights(RecordingLoss.first_weights, network_io.load_network(str(snapshot), verbose=False).state_dict())

def test_edm_state_resume_loads_the_weights(learned, tmp_path):
    # EDM's state dump pickles the network being trained; the EMA comes from the snapshot beside
    # it. kimg 1000 makes the EMA half-life long, so one step leaves the EMA near what was loaded.
    ema = perturbed_snapshot(learned.c, learned.state, tmp_path / 'network-snapshot-001000.pkl')
    net = network_io.load_network(str(tmp_path / 'network-snapshot-001000.pkl'), verbose=False)
    weights = perturbed_snapshot(learned.c, dict(net=ema), tmp_path / 'unused.pkl')
    net.load_state_dict(weights)
    torch.save(dict(net=net.train(), optimizer_state=torch.optim.Adam(net.parameters()).state_dict()), tmp_path / 'training-state-001000.pt')
    _, state, output = train_in_process(['--data', learned.data, '--cond=1', '--aot=16', '--dropout=0', '--augment=0', '--duration=1.000032',
                                         '--resume', str(tmp_path / 'training-state-001000.pt')] + TINY, tmp_path / 'run')
    assert 'it contains pickled code' in output
    assert_same_weights(RecordingLoss.first_weights, weights)
    assert_near(state['ema'], ema, weights)
    assert state['cur_nimg'] == 1000032

def test_loop_prints_the_class_names(tmp_path, capsys):
    data = make_dataset(tmp_path / 'named', n=16, num_classes=2)
    meta = json.loads(open(os.path.join(data, 'dataset.json')).read())
    with open(os.path.join(data, 'dataset.json'), 'w') as f:
        json.dump(dict(meta, class_names=['cat', 'dog']), f)
    train_in_process(['--data', data, '--cond=1', '--aot=16', '--duration=0.000032'] + TINY, tmp_path / 'run') # two steps: a state to return
    assert '\nClasses: 0=cat, 1=dog\n' in capsys.readouterr().out # in the run's log.txt when train.py runs it

def test_error_bf16_with_fp16(tmp_path, data):
    expect_cli_error(tmp_path, ['--data', data, '--aot=16', '--bf16', '--fp16=1'] + TINY, '--bf16 and --fp16=1')
