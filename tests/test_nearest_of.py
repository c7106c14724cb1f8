"""Nearest-of-K noise (train.py --nearest-of): each image keeps the nearest of K candidate noises of
its own; the candidates follow the image's position in the sample sequence, so they are the same
for any process count, pool size and resume point. The shift of the kept noise is measured."""

import json
import os

import numpy as np
import pytest
import torch

from tests.helpers import TINY, assert_same_weights, all_tensors, only_run_dir, run_train as run
from training import aot
from training.dataset import ImageFolderDataset
from training.pools import PoolStream, nearest_candidates
from training.testdata import make_dataset

@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp('d') / 'data', n=64, res=8, num_classes=4)

@pytest.fixture(scope='module')
def dataset(data):
    return ImageFolderDataset(data, use_labels=True)

def test_nearest_takes_each_images_nearest_candidate():
    gen = torch.Generator().manual_seed(0)
    images = torch.rand([50, 3, 4, 4], generator=gen) * 2 - 1
    candidates = torch.randn([50, 5, 3, 4, 4], generator=gen)
    noise, stats = aot.nearest(images, candidates)
    dist = (candidates.double() - images.double()[:, None]).flatten(2).norm(dim=2) # [50, 5]
    best = dist.argmin(dim=1)
    assert len(set(best.tolist())) > 1 # not always the same slot
    assert torch.equal(noise, candidates[torch.arange(50), best])
    assert stats['cost_before'] == pytest.approx(dist[:, 0].mean().item(), rel=1e-6)
    assert stats['cost_after'] == pytest.approx(dist.min(dim=1).values.mean().item(), rel=1e-6)
    # Only an image's own candidates count: another image's candidate next to it is not taken.
    near = candidates.clone()
    near[1, 0] = images[0]
    assert torch.equal(aot.nearest(images, near)[0][0], noise[0])

def test_nearest_refuses_candidates_of_another_shape():
    with pytest.raises(ValueError, match=r'must be \[N, K, \.\.\.\]'):
        aot.nearest(torch.zeros([4, 3, 2, 2]), torch.zeros([4, 3, 2, 2]))

def pools_by_position(dataset, pool_size, replicas, pools, k=4):
    """{position: (dataset index, noise)} of the first pools of every rank."""
    out = {}
    for rank in range(replicas):
        stream = PoolStream(dataset, pool_size, seed=5, rank=rank, num_replicas=replicas, pair=False, nearest_of=k)
        for p in range(pools):
            pool = stream.make_pool(p)
            for pos, i, z in zip(stream.pool_positions(p), pool['indices'], pool['noise']):
                out[int(pos)] = (int(i), z)
    return out

def test_candidates_follow_the_position_not_the_process_count(dataset):
    one = pools_by_position(dataset, 32, 1, 3)    # one process, 3 pools of 32: positions 0-95 (1.5 epochs)
    two = pools_by_position(dataset, 16, 2, 3)    # two ranks with half the per-GPU batch
    small = pools_by_position(dataset, 8, 1, 12)  # one process, --batch-gpu 8
    assert one.keys() == two.keys() == small.keys() == set(range(96))
    for pos, (i, z) in one.items():
        for other in (two, small):
            assert other[pos][0] == i and torch.equal(other[pos][1], z), pos
    # The candidates depend on the position (and seed), not on the image: an image seen in two epochs
    # draws fresh candidates.
    again = [(a, b) for a in range(64) for b in range(64, 96) if one[a][0] == one[b][0]]
    assert again and not any(torch.equal(one[a][1], one[b][1]) for a, b in again)
    assert not torch.equal(nearest_candidates(5, [0], 4, [3, 8, 8]), nearest_candidates(6, [0], 4, [3, 8, 8]))

def test_kept_noise_leans_towards_its_image(dataset):
    # Independent noise: norm / sqrt(D) near 1, projection on the image near 0 (sd 1/sqrt(N)). AOT's
    # permutation keeps the noises, hence their norms; nearest-of-K keeps smaller and nearer ones.
    stream = lambda **kw: {k: float(v) for k, v in PoolStream(dataset, 64, seed=1, **kw).make_pool(0)['stats'].items()}
    plain, paired, nearest = stream(pair=False), stream(pair=True), stream(pair=False, nearest_of=8)
    assert abs(plain['noise_norm'] - 1) < 0.02 and abs(plain['noise_proj']) < 4 / 8
    assert paired['noise_norm'] == pytest.approx(plain['noise_norm'], rel=1e-6) and paired['noise_proj'] > 4 / 8
    assert nearest['noise_norm'] < plain['noise_norm'] - 0.01 and nearest['noise_proj'] > 4 / 8
    assert nearest['cost_after'] < nearest['cost_before']

def test_cuda_nearest_pool_has_the_cpu_pools_noise(dataset):
    if not torch.cuda.is_available():
        pytest.skip('needs CUDA: compares a nearest-of-K pool built on the GPU with the same pool built on the CPU')
    # The candidates are drawn on the CPU for both; the choice is made on the pool's device.
    gpu, cpu = (PoolStream(dataset, 64, seed=3, pair=False, nearest_of=8, device=d).make_pool(1) for d in ('cuda', 'cpu'))
    same = (gpu['noise'].cpu() == cpu['noise']).flatten(1).all(dim=1)
    assert same.float().mean() >= 0.95, same.float().mean() # float32 distances may break a near-tie otherwise
    assert gpu['stats']['cost_after'] == pytest.approx(cpu['stats']['cost_after'], rel=1e-4)

#----------------------------------------------------------------------------
# train.py --nearest-of: refused with AOT, resumed exactly, under 2-process torchrun.

def one_line_error(proc, text):
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith('Error: ') and text in lines[0], proc.stderr

@pytest.mark.parametrize('args,text', [
    (['--nearest-of=4', '--aot=16'], '--nearest-of=4 and --aot=16 are two couplings of noise to images; use --aot=0 with --nearest-of'),
    (['--nearest-of=1'], '--nearest-of=1 is plain EDM noise; use --nearest-of=K with K >= 2'),
])
def test_refused_in_one_line(tmp_path, data, args, text):
    one_line_error(run(['--outdir', str(tmp_path), '--data', data, '--dry-run'] + TINY + args, check=False), text)

def test_aot_defaults_to_off_with_nearest_of(tmp_path, data):
    proc = run(['--outdir', str(tmp_path), '--data', data, '--dry-run', '--nearest-of=4'] + TINY)
    options = json.loads(proc.stdout[proc.stdout.index('{'):proc.stdout.index('\n}') + 2])
    assert (options['aot_pool'], options['nearest_of']) == (0, 4)

@pytest.mark.slow
def test_resume_equals_uninterrupted(tmp_path, data):
    common = ['--data', data, '--cond=1', '--nearest-of=4', '--dump=1', '--nosubdir'] + TINY
    if torch.cuda.is_available(): # CUDA's default kernels are not bitwise reproducible (docs/training.md)
        common.append('--deterministic')
    full = run(['--outdir', str(tmp_path / 'full'), '--duration=0.000064'] + common)
    assert 'nearest of 4 noises per image' in full.stdout and 'nearest_gain' in full.stdout
    run(['--outdir', str(tmp_path / 'part'), '--duration=0.000032'] + common)
    assert 'resuming from it' in run(['--outdir', str(tmp_path / 'part'), '--duration=0.000064'] + common).stdout
    a, b = (torch.load(tmp_path / d / 'training-state-000000.pt', weights_only=True) for d in ['full', 'part'])
    assert a['cur_nimg'] == b['cur_nimg'] == 64 and a['nearest_of'] == 4
    assert_same_weights(all_tensors(a), all_tensors(b))
    # The run folder records K: resuming with another is refused.
    other = run(['--resume', str(tmp_path / 'part'), '--nearest-of=8', '--dry-run'], check=False)
    one_line_error(other, '--nearest-of=8 (the run has 4)')

@pytest.mark.slow
def test_two_ranks(tmp_path, data):
    proc = run(['--outdir', str(tmp_path), '--data', data, '--cond=1', '--nearest-of=4', '--duration=0.000032'] + TINY, torchrun=2)
    assert 'weights identical on all 2 ranks' in proc.stdout and 'nearest_gain' in proc.stdout
    with open(os.path.join(only_run_dir(tmp_path), 'stats.jsonl')) as f:
        stats = [json.loads(line) for line in f]
    assert all(0 < s['AOT/cost_after']['mean'] < s['AOT/cost_before']['mean'] for s in stats)
