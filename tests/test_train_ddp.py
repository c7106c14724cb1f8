"""Training across processes and devices: every architecture under 2-process DDP (gloo on CPU),
rank-0 decisions, the pools' random streams kept apart from the trainer's, the fast numeric
modes, non-finite gradients logged. Device and backend choice: tests/test_utils.py."""

import json
import os
import shutil
import signal
import subprocess
import sys

import psutil
import pytest
import torch

from tests.helpers import ROOT, TINY, all_tensors, assert_same_weights, final_losses, only_run_dir, run_train as run
from training.dataset import ImageFolderDataset
from training.pools import PoolStream
from training.testdata import make_dataset

@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp('d') / 'data', n=40, res=8, num_classes=4)

#----------------------------------------------------------------------------
# Every architecture trains on 2 ranks. NCSN++'s Fourier frequencies are a buffer drawn from each
# rank's own seed: unless rank 0's buffers are broadcast, the snapshot's consistency check fails.

@pytest.mark.slow
@pytest.mark.parametrize('arch,extra', [
    ('ddpmpp', ['--workers=1']),                 # pools from a DataLoader worker
    ('ncsnpp', ['--precond=ve']),                # pools built in-process (TINY has --workers=0)
    ('adm', ['--batch-gpu=4', '--aot=8']),       # gradient accumulation
])
def test_two_ranks_every_arch(tmp_path, data, arch, extra):
    args = ['--outdir', str(tmp_path), '--data', data, '--cond=1', f'--arch={arch}', '--aot=16', '--duration=0.000016']
    proc = run(args + TINY + extra, torchrun=2)
    assert 'weights identical on all 2 ranks' in proc.stdout
    # The broadcast of rank 0's weights is no part of any gradient (autograd warns of c10d ops it
    # records), and DDP is built with the flag the installed torch knows (no FutureWarning).
    assert 'autograd kernel was not registered' not in proc.stderr and 'FutureWarning' not in proc.stderr, proc.stderr[-3000:]
    run_dir = only_run_dir(tmp_path)
    assert os.path.isfile(os.path.join(run_dir, 'network-snapshot-000000.pkl'))

#----------------------------------------------------------------------------
# Preemption: a signal that reaches one rank only (as SLURM may send it) stops all ranks after the
# same step; the state is saved and every rank exits with status 75 (torchrun then exits 1). The
# re-run with --resume=RUN_DIR alone ends bit for bit where the uninterrupted run does. Three
# ranks, because a sum of two is exact in any order: only with three can a first step after the
# resume that reduces gradients in DDP's initial bucket layout (not the rebuilt one) show.

@pytest.mark.slow
def test_signal_to_one_rank_then_resume_equals_uninterrupted(tmp_path, data):
    args = ['--data', data, '--cond=1', '--aot=24', '--dump=1', '--duration=0.000192'] + TINY + ['--batch=24', '--tick=0.048', '--grid=0', '--workers=1']
    run(['--outdir', str(tmp_path / 'full')] + args, torchrun=3)
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=3', 'train.py', '--outdir', str(tmp_path / 'part')] + args
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dict(os.environ, PYTHONUNBUFFERED='1'))
    output = []
    for line in proc.stdout:
        output.append(line)
        if line.startswith('tick 0'): # every rank is training: the handlers are in place
            rank1 = [p for p in psutil.Process(proc.pid).children() if p.environ().get('RANK') == '1']
            rank1[0].send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=600) == 1, ''.join(output[-30:]) # torchrun's status for a failed worker
    text = ''.join(output)
    assert 'Stopped by SIGUSR1' in text and text.count('exitcode  : 75') == 3, text[-3000:]
    run_dir = only_run_dir(tmp_path / 'part')
    assert torch.load(os.path.join(run_dir, 'training-state-latest.pt'), weights_only=True)['cur_nimg'] < 192 # stopped early
    run(['--resume', run_dir], torchrun=3)
    a, b = (torch.load(os.path.join(only_run_dir(tmp_path / d), 'training-state-000000.pt'), weights_only=True) for d in ['part', 'full'])
    assert a['cur_nimg'] == b['cur_nimg'] == 192
    assert_same_weights(all_tensors(a), all_tensors(b))

def test_ddp_wrap_syncs_no_buffers_per_forward_without_a_warning():
    # torch 2.13 deprecates broadcast_buffers (a FutureWarning on every rank of every run).
    import warnings
    from torch_utils import distributed as dist
    dist.init()
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        ddp = dist.wrap_ddp(torch.nn.BatchNorm1d(3), torch.device('cpu'))
    assert ddp.broadcast_buffers is False # both releases' name of the per-forward buffer sync

def test_stop_requests_open_no_group_and_see_the_launcher_go(monkeypatch):
    # The agreement runs over the default group (NCCL runs need no gloo group beside it), one step late.
    from torch_utils import distributed as dist
    from training import training_loop
    dist.init()
    def no_new_group(*args, **kwargs):
        raise AssertionError('StopRequests opened a process group of its own')
    monkeypatch.setattr(torch.distributed, 'new_group', no_new_group)
    requests = training_loop.StopRequests(None, torch.device('cpu'))
    try:
        assert requests.poll() == (0, False)
        requests.received = signal.SIGTERM
        assert requests.poll() == (0, False) # read after the next step
        assert requests.poll() == (signal.SIGTERM, False)
        requests.received = 0
        monkeypatch.setattr(dist, '_launcher', os.getppid() + 1) # the agent recorded at start is no longer our parent
        requests.poll()
        assert requests.poll() == (training_loop.LAUNCHER_GONE, False)
        assert training_loop.stop_reason(training_loop.LAUNCHER_GONE) == 'the loss of the launcher (torchrun)'
    finally:
        requests.close(stopped=False)

#----------------------------------------------------------------------------
# A torchrun agent that dies (SIGKILL, or SIGUSR1, which it does not handle by default) leaves its
# workers orphaned, in sessions of their own: they notice their parent is gone, stop after the same
# step, write the state and exit (75); --resume then ends bit for bit where the uninterrupted run
# does. With SIGUSR1 in --signals-to-handle (docs/training.md) the agent forwards it instead.

LAUNCHER_ARGS = ['--cond=1', '--aot=16', '--dump=1', '--duration=0.000320'] + TINY + ['--grid=0']

@pytest.fixture(scope='module')
def launcher_full(tmp_path_factory, data):
    out = tmp_path_factory.mktemp('launcher_full')
    run(['--outdir', str(out), '--data', data] + LAUNCHER_ARGS, torchrun=2)
    return torch.load(os.path.join(only_run_dir(out), 'training-state-000000.pt'), weights_only=True)

@pytest.mark.slow
@pytest.mark.parametrize('sig,handled', [(signal.SIGKILL, False), (signal.SIGUSR1, False), (signal.SIGUSR1, True)])
def test_launcher_gone_then_resume_equals_uninterrupted(tmp_path, data, launcher_full, sig, handled):
    launcher = ['--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1'] if handled else []
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', *launcher,
           'train.py', '--outdir', str(tmp_path), '--data', data] + LAUNCHER_ARGS
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dict(os.environ, PYTHONUNBUFFERED='1'))
    output, workers = [], []
    for line in proc.stdout: # read to the end: the orphaned workers hold the pipe until they exit
        output.append(line)
        if line.startswith('tick 0'): # every rank is training
            workers = [p for p in psutil.Process(proc.pid).children() if 'RANK' in p.environ()]
            proc.send_signal(sig)
    status = proc.wait(timeout=600)
    assert len(workers) == 2
    gone, alive = psutil.wait_procs(workers, timeout=120)
    assert not alive, ''.join(output[-30:])
    text = ''.join(output)
    run_dir = only_run_dir(tmp_path)
    log = open(os.path.join(run_dir, 'log.txt')).read()
    if handled:
        assert status == 1 and 'Stopped by SIGUSR1' in log, text[-3000:] # a signalled agent lists no exit codes
    else:
        assert status == -sig, text[-3000:]
        assert 'Stopped by the loss of the launcher (torchrun)' in log and 'Exit status 75' in log, log[-3000:]
    assert torch.load(os.path.join(run_dir, 'training-state-latest.pt'), weights_only=True)['cur_nimg'] < 320 # stopped early
    run(['--resume', run_dir], torchrun=2)
    state = torch.load(os.path.join(run_dir, 'training-state-000000.pt'), weights_only=True)
    assert state['cur_nimg'] == launcher_full['cur_nimg'] == 320
    assert_same_weights(all_tensors(state), all_tensors(launcher_full))

@pytest.mark.slow
@pytest.mark.skipif(not (torch.cuda.is_available() and torch.distributed.is_nccl_available()), reason='needs a GPU and NCCL')
def test_stop_agreed_over_nccl(tmp_path, data):
    # One rank under torchrun on a GPU has an NCCL group: the flags go through a device all_reduce
    # read back by a side stream. SIGUSR1 to the worker stops it after a step, with the state saved.
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=1',
           'train.py', '--outdir', str(tmp_path), '--data', data] + LAUNCHER_ARGS
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dict(os.environ, PYTHONUNBUFFERED='1'))
    output = []
    for line in proc.stdout:
        output.append(line)
        if line.startswith('tick 0'):
            [worker] = [p for p in psutil.Process(proc.pid).children() if 'RANK' in p.environ()]
            worker.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=600) == 1, ''.join(output[-30:])
    run_dir = only_run_dir(tmp_path)
    assert 'Stopped by SIGUSR1' in open(os.path.join(run_dir, 'log.txt')).read(), ''.join(output[-30:])
    assert torch.load(os.path.join(run_dir, 'training-state-latest.pt'), weights_only=True)['cur_nimg'] < 320

#----------------------------------------------------------------------------
# Rank 0 decides resume-or-fresh and the seed, even when the other ranks see other files.

DECIDE = '''
import json, sys, click, torch
import train
from torch_utils import distributed as dist
from dnnlib import EasyDict
dist.init()
rank = dist.get_rank()
out = {}
# Rank 0 sees a run directory with a state in it; rank 1 sees an empty one.
opts = EasyDict(nosubdir=True, resume=None, transfer=None, outdir=sys.argv[1] if rank == 0 else sys.argv[2])
out['resume'] = train.on_rank0(train.decide_resume, opts)
try: # rank 0 finds no state in the directory it is told to resume from; rank 1 would find one
    train.on_rank0(train.decide_resume, EasyDict(opts, nosubdir=False, resume=sys.argv[2] if rank == 0 else sys.argv[1]))
    out['error'] = None
except click.ClickException as err:
    out['error'] = err.message
out['seed'] = train.on_rank0(lambda: int(torch.randint(1 << 31, size=[])))
with open(sys.argv[3] + f'.{rank}', 'w') as f:
    json.dump(out, f)
'''

@pytest.mark.slow
def test_resume_and_seed_decided_on_rank0(tmp_path):
    full, empty = tmp_path / 'full', tmp_path / 'empty'
    full.mkdir()
    empty.mkdir()
    (full / 'training-state-000004.pt').write_bytes(b'')
    script = tmp_path / 'decide.py'
    script.write_text(DECIDE)
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', str(script),
        str(full), str(empty), str(tmp_path / 'out')], cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads((tmp_path / f'out.{rank}').read_text()) for rank in range(2)]
    for r in results:
        assert r['resume'] == str(full / 'training-state-000004.pt')
        assert r['error'] == f'--resume={empty}: no training-state-*.pt in that directory'
    assert results[0]['seed'] == results[1]['seed']

#----------------------------------------------------------------------------
# The pools' random streams are their own: building a pool never seeds or advances the
# trainer's generators, on any device, in-process or in the background thread.

@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
    return ImageFolderDataset(make_dataset(str(tmp_path_factory.mktemp('data'))), use_labels=True)

def aug():
    from training.augment import AugmentPipe
    return AugmentPipe(p=0.5, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)

def test_pool_never_reseeds_trainer(dataset, monkeypatch):
    # torch.manual_seed would also reseed every CUDA device (the trainer's dropout and sigma draws).
    def forbidden(*args, **kwargs):
        raise AssertionError('a pool reseeded a global generator')
    for name in ['manual_seed', 'seed']:
        monkeypatch.setattr(torch, name, forbidden)
        monkeypatch.setattr(torch.cuda, name, forbidden)
        monkeypatch.setattr(torch.cuda, name + '_all', forbidden)
    monkeypatch.setattr(torch.random, 'manual_seed', forbidden)
    state = torch.get_rng_state()
    PoolStream(dataset, 8, augment_pipe=aug()).make_pool(0)
    assert torch.equal(torch.get_rng_state(), state)

def test_in_process_pools_leave_trainer_stream_alone(dataset):
    torch.manual_seed(1)
    expected = [torch.randn(64) for _ in range(200)]
    torch.manual_seed(1)
    stream = iter(PoolStream(dataset, 16, seed=5, augment_pipe=aug())) # --workers 0: built between the trainer's draws
    got = []
    pools = [next(stream)]
    for i in range(200):
        got.append(torch.randn(64))
        if i % 50 == 0:
            pools.append(next(stream))
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    reference = PoolStream(dataset, 16, seed=5, augment_pipe=aug())
    for k, pool in enumerate(pools):
        assert torch.equal(pool['noise'], reference.make_pool(k)['noise'])

@pytest.mark.parametrize('solver', ['scipy', 'lap'])
def test_in_process_pools_equal_pure_pools(dataset, solver):
    pytest.importorskip(solver)
    stream = PoolStream(dataset, 10, seed=7, solver=solver, start_pool=3, augment_pipe=aug())
    pools = iter(stream)
    for k in range(3, 9):
        got, expected = next(pools), stream.make_pool(k)
        for key in ['images', 'labels', 'augment_labels', 'noise', 'indices']:
            assert torch.equal(got[key], expected[key]), (k, key)
        assert got['stats'] == expected['stats']

#----------------------------------------------------------------------------
# Fast numerics and gradient hygiene.

@pytest.mark.slow
def test_fast_modes_train(tmp_path, data):
    proc = run(['--outdir', str(tmp_path), '--data', data, '--cond=1', '--aot=16', '--duration=0.000032',
                '--tf32', '--bf16', '--deterministic'] + TINY)
    assert 'Fast numerics:           tf32, bf16' in proc.stdout
    run_dir = only_run_dir(tmp_path)
    assert run_dir.endswith('-bf16')
    losses = final_losses(run_dir)
    assert losses and all(0 < x < 10 for x in losses)

def compile_unavailable():
    """Why torch.compile's default backend (inductor) cannot run here, None if it can: on the CPU it
    builds C++ kernels and needs a compiler."""
    if not any(shutil.which(c) for c in [os.environ.get('CXX', ''), 'g++', 'c++', 'clang++'] if c):
        return "torch.compile's inductor backend builds C++ kernels on the CPU, and no C++ compiler is on PATH"
    if os.environ.get('ATEN_CPU_CAPABILITY') == 'default':
        return ("with ATEN_CPU_CAPABILITY=default, inductor's generated C++ still uses at::vec, which torch's "
                "headers then leave undefined (torch's limitation, not this project's)")
    return None

@pytest.mark.slow
def test_compile_trains(tmp_path, data):
    # --compile (inductor) on the CPU: a few steps of a tiny network, losses finite, a snapshot written.
    reason = compile_unavailable()
    if reason:
        pytest.skip(reason)
    proc = run(['--outdir', str(tmp_path), '--data', data, '--cond=1', '--aot=16', '--duration=0.000048', '--compile'] + TINY)
    assert 'Fast numerics:           compile' in proc.stdout
    losses = final_losses(only_run_dir(tmp_path))
    assert len(losses) == 2 and all(0 < x < 10 for x in losses)
    assert os.path.isfile(os.path.join(only_run_dir(tmp_path), 'network-snapshot-000000.pkl'))

@pytest.mark.slow
def test_bf16_compile_under_ddp_compiles_once(data):
    # The pass that settles DDP's buckets runs under the steps' bf16 autocast: torch.compile guards on
    # the autocast state, and a pass outside it made the first step compile the network again
    # (~110 s on the H100). A backend that counts what dynamo hands it stands in for inductor.
    from torch_utils import distributed as dist
    from training import loss, networks, training_loop
    dist.init() # a one-process group, as train.py's
    torch.manual_seed(0)
    net = networks.EDMPrecond(img_resolution=8, img_channels=3, label_dim=4, model_type='SongUNet', model_channels=8,
                              channel_mult=[1, 1], num_blocks=1, attn_resolutions=[4])
    net.model.register_forward_hook(training_loop._float32_output)
    ddp = dist.wrap_ddp(net, torch.device('cpu'))
    graphs = []
    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    forward = torch.compile(ddp, backend=counting_backend)
    loss_fn, shape = loss.EDMLoss(), [4, 3, 8, 8]
    training_loop.settle_ddp_buckets(forward, loss_fn, device=torch.device('cpu'), bf16=True,
                                     shapes=dict(images=shape, labels=[4, 4], noise=shape, augment_labels=None))
    compiled = len(graphs)
    assert compiled > 0
    with torch.autocast('cpu', dtype=torch.bfloat16): # a training step, as training_loop runs it
        out = loss_fn(net=forward, images=torch.randn(shape), labels=torch.eye(4), noise=torch.randn(shape))
    out.sum().backward()
    assert len(graphs) == compiled, f'the first step compiled {len(graphs) - compiled} more graph(s)'

@pytest.mark.slow
def test_bf16_with_fp16_refused(tmp_path, data):
    proc = run(['--outdir', str(tmp_path), '--data', data, '--bf16', '--fp16=1'] + TINY, check=False)
    assert proc.returncode != 0 and 'Error: --bf16 and --fp16=1' in proc.stderr

@pytest.mark.slow
def test_nonfinite_gradients_logged_not_skipped(tmp_path, data):
    # A loss scale that overflows fp32 makes every gradient infinite: EDM's semantics replace the
    # values and take the step anyway; the count of such steps is logged.
    run(['--outdir', str(tmp_path), '--data', data, '--aot=16', '--duration=0.000032', '--ls=1e38'] + TINY)
    run_dir = only_run_dir(tmp_path)
    with open(os.path.join(run_dir, 'stats.jsonl')) as f:
        ticks = [json.loads(line) for line in f]
    assert sum(t['Progress/nonfinite_steps']['mean'] for t in ticks) == 2 # both steps
    assert ticks[-1]['Progress/kimg']['mean'] == pytest.approx(0.032) # steps taken, not skipped
    assert 'nonfinite_steps 1' in open(os.path.join(run_dir, 'log.txt')).read()

@pytest.mark.slow
def test_train_speed_bench_runs(data):
    proc = subprocess.run([sys.executable, 'bench/train_speed.py', '--configs=default,bf16', f'--data={data}', '--no-doc',
        '--train-args=--cbase=8 --cres=1,1 --batch=16 --aot=16 --augment=0.12', '--kimg=0.064', '--tick=0.032'],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith('| default |') or line.startswith('| bf16 |')]
    assert len(rows) == 2 and rows[0].split('|')[5].strip() == '1.00x'
    assert 'CPU only' in proc.stdout or 'NVIDIA' in proc.stdout or 'GPU' in proc.stdout # the device is named
