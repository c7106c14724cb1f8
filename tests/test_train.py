"""train.py end to end on CPU: every precond, AOT on/off, augmentation on/off, gradient
accumulation, a 2-process torchrun, exact resume, and the refusal of bad input."""

import glob
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from tests.datagen import make_dataset
from training import network_io

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--cbase=8', '--cres=1,1', '--batch=16', '--tick=0.032', '--seed=0', '--grid=4', '--workers=0']

def run(args, torchrun=0, check=True):
    cmd = [sys.executable] + (['-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={torchrun}'] if torchrun else [])
    proc = subprocess.run(cmd + ['train.py'] + args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f'train.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}')
    return proc

def only_run_dir(outdir):
    dirs = [d for d in glob.glob(os.path.join(outdir, '*')) if os.path.isdir(d)]
    assert len(dirs) == 1
    return dirs[0]

def final_losses(run_dir):
    with open(os.path.join(run_dir, 'stats.jsonl')) as f:
        return [json.loads(line)['Loss/loss']['mean'] for line in f]

@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp('d') / 'data', n=40, res=8, num_classes=4)

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

def test_torchrun_two_ranks(tmp_path, data):
    proc = run(['--outdir', str(tmp_path), '--data', data, '--cond=1', '--aot=16', '--duration=0.000064'] + TINY, torchrun=2)
    assert 'weights identical on all 2 ranks; each rank trained on its own images.' in proc.stdout
    assert 'gpus2-batch16' in only_run_dir(tmp_path)

def state_tensors(path):
    state = torch.load(path, weights_only=True)
    return state['cur_nimg'], {**{f'net.{k}': v for k, v in state['net'].items()}, **{f'ema.{k}': v for k, v in state['ema'].items()}}

def test_resume_equals_uninterrupted(tmp_path, data):
    common = ['--data', data, '--cond=1', '--aot=32', '--dump=1', '--nosubdir', '--workers=1'] + TINY
    run(['--outdir', str(tmp_path / 'full'), '--duration=0.000128'] + common)
    run(['--outdir', str(tmp_path / 'part'), '--duration=0.000064'] + common)
    # A plain re-run in the same directory picks up the latest state.
    proc = run(['--outdir', str(tmp_path / 'part'), '--duration=0.000128'] + common)
    assert 'resuming from it' in proc.stdout
    nimg_a, a = state_tensors(tmp_path / 'full' / 'training-state-000000.pt')
    nimg_b, b = state_tensors(tmp_path / 'part' / 'training-state-000000.pt')
    assert nimg_a == nimg_b == 128
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key

#----------------------------------------------------------------------------
# Bad input: one line, non-zero exit, no run directory left behind.

def expect_error(tmp_path, args, message, torchrun=0):
    outdir = tmp_path / 'out'
    proc = run(['--outdir', str(outdir)] + args, torchrun=torchrun, check=False)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith('Error:')]
    assert errors and message in errors[0], proc.stderr[-2000:]
    if not torchrun: # torchrun adds its own report of the failed child
        assert 'Traceback' not in proc.stderr
    assert not outdir.exists() or not any(outdir.iterdir())

def test_error_missing_dataset(tmp_path):
    expect_error(tmp_path, ['--data', str(tmp_path / 'nope.zip')] + TINY, 'nope.zip')

def test_error_corrupt_dataset(tmp_path):
    bad = tmp_path / 'bad.zip'
    bad.write_bytes(b'this is not a zip file')
    expect_error(tmp_path, ['--data', str(bad)] + TINY, 'bad.zip')

def test_error_cond_without_labels(tmp_path):
    data = make_dataset(tmp_path / 'nolabels', n=8, labels=False)
    expect_error(tmp_path, ['--data', data, '--cond=1'] + TINY, '--cond=1 requires labels')

def test_error_pool_not_multiple_of_batch_gpu(tmp_path, data):
    expect_error(tmp_path, ['--data', data, '--aot=20', '--batch-gpu=8'] + TINY, '--aot=20 is not a multiple of the per-GPU batch 8')

def test_error_resolution_not_power_of_two(tmp_path):
    data = make_dataset(tmp_path / 'res12', n=8, res=12)
    expect_error(tmp_path, ['--data', data] + TINY, 'power of two')

def test_error_unreadable_resume_and_transfer(tmp_path, data):
    state = tmp_path / 'training-state-000001.pt'
    state.write_bytes(b'garbage')
    expect_error(tmp_path, ['--data', data, '--resume', str(state)] + TINY, 'cannot read training state')
    expect_error(tmp_path, ['--data', data, '--transfer', str(tmp_path / 'missing.pkl')] + TINY, 'missing.pkl')

def test_error_batch_not_divisible_by_world(tmp_path, data):
    expect_error(tmp_path, ['--data', data, '--aot=0'] + TINY + ['--batch=15'], 'not divisible by the number of GPUs (2)', torchrun=2)

def test_resume_from_edm_state_and_transfer(tmp_path, data):
    # EDM's state dumps pickle the network object and keep the EMA in the snapshot beside them.
    common = ['--data', data, '--cond=1', '--aot=16', '--duration=0.000032'] + TINY
    run(['--outdir', str(tmp_path / 'first')] + common)
    snapshot = os.path.join(only_run_dir(tmp_path / 'first'), 'network-snapshot-000000.pkl')
    edm_dir = tmp_path / 'edm'
    edm_dir.mkdir()
    net = network_io.load_network(snapshot, verbose=False).train().requires_grad_(True)
    torch.save(dict(net=net, optimizer_state=torch.optim.Adam(net.parameters()).state_dict()), edm_dir / 'training-state-000000.pt')
    os.link(snapshot, edm_dir / 'network-snapshot-000000.pkl')
    proc = run(['--outdir', str(tmp_path / 'resumed'), '--resume', str(edm_dir / 'training-state-000000.pt')] + common)
    assert 'it contains pickled code' in proc.stdout
    assert final_losses(only_run_dir(tmp_path / 'resumed'))
    proc = run(['--outdir', str(tmp_path / 'transfer'), '--transfer', snapshot] + common)
    assert 'unpickling runs code' in proc.stdout
    assert final_losses(only_run_dir(tmp_path / 'transfer'))
