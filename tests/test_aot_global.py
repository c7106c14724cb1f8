"""--aot-scope=global: one assignment over the pools of all ranks. Its pairing must equal, exactly,
that of one process pairing the concatenated pool (2 and 3 gloo processes on the CPU), pools
built ahead in several threads must not reorder the ranks' collectives, and training with it
resumes exactly."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.datagen import make_dataset
from tests.test_train import ROOT, TINY, all_tensors, assert_same_weights, latest_state, only_run_dir, run
from training import aot
from training.augment import AugmentPipe
from training.dataset import ImageFolderDataset
from training.pools import _NOISE_TAG, PoolStream, _mix, solver_ranks

POOLS = 5 # built 4 ahead in threads: the exchange must keep pool order

# Run by torchrun: every rank builds global pools start..start+POOLS-1 and saves what it got.
SCRIPT = r'''
import sys, torch
sys.path.insert(0, sys.argv[1])
from torch_utils import distributed as dist
from training.augment import AugmentPipe
from training.dataset import ImageFolderDataset
from training.pools import GlobalExchange, PoolPrefetcher, PoolStream
data, out, pool, start, augment, solver = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6]), sys.argv[7]
dist.init()
rank, world = dist.get_rank(), dist.get_world_size()
pipe = AugmentPipe(p=augment, xflip=1, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1) if augment else None
stream = PoolStream(ImageFolderDataset(data, use_labels=True), pool, seed=7, rank=rank, num_replicas=world, augment_pipe=pipe,
                    solver=solver, start_pool=start, exchange=GlobalExchange(rank, world, start))
pools = PoolPrefetcher(stream, max_ahead=4)
got = [next(pools) for _ in range(%d)]
pools.close(finish=True)
torch.save(got, f'{out}/rank{rank}.pt')
''' % POOLS

def run_global(tmp_path, data, world, pool, start=0, augment=0.0, solver='scipy'):
    script = tmp_path / 'global_pools.py'
    script.write_text(SCRIPT)
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={world}', str(script),
           ROOT, data, str(tmp_path), str(pool), str(start), str(augment), solver]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [torch.load(tmp_path / f'rank{r}.pt', weights_only=False) for r in range(world)]

def reference(data, world, pool, k, augment=0.0, solver='scipy'):
    """Pool k of every rank paired as one process pairs the concatenation: images, labels, noise."""
    dataset = ImageFolderDataset(data, use_labels=True)
    pipe = AugmentPipe(p=augment, xflip=1, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1) if augment else None
    parts = [PoolStream(dataset, pool, seed=7, rank=r, num_replicas=world, augment_pipe=pipe).load(k) for r in range(world)]
    images = torch.cat([p['images'] for p, _, _ in parts])
    labels = torch.cat([labels for _, labels, _ in parts])
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(_mix(_NOISE_TAG, 7, k)))
    idx = aot.assign(images, noise, labels if dataset.label_dim else None, solver=solver)
    return images, labels, noise[idx], noise

@pytest.mark.parametrize('world,classes,augment,start,solver', [(2, 4, 0.0, 0, 'scipy'), (3, 4, 0.3, 2, 'scipy'), (3, 0, 0.0, 0, 'scipy'),
                                                                (2, 13, 0.0, 1, 'scipy'), (2, 0, 0.0, 0, 'knn')])
def test_global_pairing_equals_one_process_pairing_the_concatenation(tmp_path, world, classes, augment, start, solver):
    # classes=13 with pools of 16: many classes with one or two images, some on one rank only.
    # knn on 2 x 24 = 48 noises, more than its 32 candidates per row: the sparse path.
    data = make_dataset(tmp_path / 'data', n=60, res=8, num_classes=max(classes, 1), labels=classes > 0)
    pool = 24 if solver == 'knn' else 16
    got = run_global(tmp_path, data, world, pool, start=start, augment=augment, solver=solver)
    moved = 0
    for j in range(POOLS):
        images, labels, paired, noise = reference(data, world, pool, start + j, augment, solver)
        for r in range(world):
            mine = slice(r * pool, (r + 1) * pool)
            assert torch.equal(got[r][j]['images'], images[mine])
            assert torch.equal(got[r][j]['noise'], paired[mine]), f'pool {start + j}, rank {r}'
        moved += (paired != noise).any(dim=(1, 2, 3)).sum().item()
        # The ranks' pools use every noise of the global pool once: still exactly standard normal.
        used = torch.cat([got[r][j]['noise'] for r in range(world)])
        assert torch.equal(used[torch.argsort(used[:, 0, 0, 0])], noise[torch.argsort(noise[:, 0, 0, 0])])
        stats = [got[r][j]['stats'] for r in range(world)]
        # One rank's images may pair worse than alone; all together never do.
        assert sum(s['cost_after'] for s in stats) <= sum(s['cost_before'] for s in stats) + 1e-9
        after = sum(s['cost_after'] for s in stats) * pool
        assert after == pytest.approx(aot.pairing_cost(images, paired), rel=1e-6)
    assert moved > 0 # the pairing did something

def test_solver_ranks_spread_classes_and_agree():
    assert solver_ranks([100], 4) == [0]
    owner = solver_ranks([10, 40, 30, 20], 2)
    assert owner == [1, 0, 1, 1] # 40 -> 0; 30 -> 1; 20 -> 1 (30^3 + 20^3 < 40^3); 10 -> 1
    assert sorted(set(solver_ranks([5] * 8, 4))) == [0, 1, 2, 3]

#----------------------------------------------------------------------------
# Training with the global scope: the pools of the two ranks differ from the gpu scope's, a run
# interrupted (SIGINT) and resumed ends bit for bit where the uninterrupted one does.

@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp('d') / 'data', n=40, res=8, num_classes=4)

def test_train_global_scope_resumes_exactly(tmp_path, data):
    args = ['--data', data, '--cond=1', '--aot=16', '--aot-scope=global', '--dump=1'] + TINY + ['--grid=0']
    full = run(['--outdir', str(tmp_path / 'full'), '--duration=0.000128'] + args, torchrun=2)
    assert 'one assignment over all 32' in full.stdout
    run(['--outdir', str(tmp_path / 'part'), '--duration=0.000064'] + args, torchrun=2)
    run(['--resume', only_run_dir(tmp_path / 'part'), '--duration=0.000128'], torchrun=2)
    a, b = [torch.load(latest_state(only_run_dir(tmp_path / name)), weights_only=True) for name in ['full', 'part']]
    assert a['cur_nimg'] == b['cur_nimg'] == 128
    assert_same_weights(all_tensors(a), all_tensors(b))
    # The same run pairing each rank's pool alone trains to other weights.
    run(['--outdir', str(tmp_path / 'gpu'), '--duration=0.000128'] + args + ['--aot-scope=gpu'], torchrun=2)
    c = all_tensors(torch.load(latest_state(only_run_dir(tmp_path / 'gpu')), weights_only=True))
    assert any(not torch.equal(v, c[k]) for k, v in all_tensors(a).items())

def test_global_scope_refuses_worker_processes(tmp_path, data):
    proc = run(['--outdir', str(tmp_path), '--data', data, '--aot=16', '--aot-scope=global'] + TINY + ['--workers=2', '--dry-run'], torchrun=2, check=False)
    assert proc.returncode != 0 and 'use --workers=0' in proc.stdout + proc.stderr

def test_global_scope_with_one_process_is_a_note(tmp_path, data):
    proc = run(['--outdir', str(tmp_path), '--data', data, '--aot=16', '--aot-scope=global'] + TINY + ['--dry-run'])
    assert 'Note: --aot-scope=global with one process' in proc.stdout

def test_scope_cost_bench_runs():
    proc = subprocess.run([sys.executable, 'bench/aot_scope_cost.py', '--world=2', '--pool=32', '--pools=1', '--classes=4', '--no-doc'],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = [line for line in proc.stdout.splitlines() if line.startswith('| 2 | 4 | 64 |')]
    assert len(row) >= 1 and float(row[0].split('|')[5]) > 0 # a global build was timed

def test_exact_solver_refuses_huge_unconditional_pools(tmp_path, data):
    from tests.test_train import expect_cli_error
    expect_cli_error(tmp_path, ['--data', data, '--cond=0', '--aot=8208'] + TINY, 'use --aot-solver=knn')
    expect_cli_error(tmp_path, ['--data', data, '--cond=0', '--aot=8208', '--aot-solver=lap'] + TINY, 'would solve exact assignments of 8208 noises')
