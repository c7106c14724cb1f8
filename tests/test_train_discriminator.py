"""train_discriminator.py: DG / DG-AOT training end to end, resume, pools, errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import train_discriminator as td
from training import aot, guidance
from training.testdata import make_dataset
from tests.helpers import with_output_pool

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def run(args):
    proc = subprocess.run([sys.executable, 'train_discriminator.py', *args], cwd=ROOT, text=True, capture_output=True, timeout=300)
    return proc.returncode, proc.stdout, proc.stderr

@pytest.fixture(scope='module')
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp('td')
    return dict(real=make_dataset(d / 'real', n=40, res=8, channels=1), fake=make_dataset(d / 'fake', n=30, res=8, channels=1),
                fake_nolabels=make_dataset(d / 'fake_nl', n=30, res=8, channels=1, labels=False),
                fake16=make_dataset(d / 'fake16', n=30, res=16, channels=1))

@pytest.mark.slow
def test_train_resume_and_load(data, tmp_path):
    args = ['--data', data['real'], '--fakes', data['fake'], '--cond=1', '--aot=16', '--batch=8', '--snap=0.032']
    code, out, err = run(args + ['--outdir', str(tmp_path / 'whole'), '--kimg=0.064'])
    assert code == 0, out + err
    assert 'Feature extractor: none given (--classifier): a small noise-conditional encoder' in out
    assert 'DG-AOT pool 16' in out and 'held-out accuracy all' in out
    stats = [json.loads(line) for line in open(tmp_path / 'whole' / 'stats.jsonl')]
    assert [s['kimg'] for s in stats] == [0.032, 0.064] and 0 <= stats[-1]['heldout_accuracy']['all'] <= 1
    assert 0 <= stats[-1]['heldout_auc']['all'] <= 1 and 'AUC all' in out
    # discriminator-best holds the snapshot of the best held-out AUC (the first one on ties).
    # (Here the first snapshot: this tiny run scores the same AUC twice, and a tie keeps the earlier one.)
    best = max(stats, key=lambda s: s['heldout_auc']['all'])
    assert best is stats[0] and stats[1]['heldout_auc']['all'] <= best['heldout_auc']['all']
    load = lambda name: guidance.load_discriminator(str(tmp_path / 'whole' / name), verbose=False).state_dict()
    best_sd, last_sd = load('discriminator-best.safetensors'), load('discriminator.safetensors')
    assert not all(torch.equal(best_sd[k], last_sd[k]) for k in best_sd)
    assert f'Best held-out AUC {best["heldout_auc"]["all"]:.3f} at kimg 0.032' in out

    # Stopped half way and run again into the same folder: the same weights as in one go.
    code, out, err = run(args + ['--outdir', str(tmp_path / 'split'), '--kimg=0.032'])
    assert code == 0, out + err
    code, out, err = run(args + ['--outdir', str(tmp_path / 'split'), '--kimg=0.064'])
    assert code == 0 and 'Resuming' in out, out + err
    whole = guidance.load_discriminator(str(tmp_path / 'whole' / 'discriminator.safetensors'), verbose=False)
    resumed = guidance.load_discriminator(str(tmp_path / 'split' / 'discriminator.safetensors'), verbose=False)
    assert (whole.img_resolution, whole.img_channels, whole.label_dim, whole.extractor) == (8, 1, 4, 'small')
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    # What generate.py --dg uses: a discriminator of P(real) on VP states.
    d = whole(torch.zeros([2, 1, 8, 8]), torch.tensor([0.1, 0.9]), torch.tensor([0, 3]))
    assert d.shape == (2,) and ((d > 0) & (d < 1)).all()

def test_best_auc_read_back_for_resume(tmp_path):
    path = tmp_path / 'stats.jsonl'
    assert td.best_auc(str(path)) == (-1.0, None)
    path.write_text('\n'.join(json.dumps(dict(kimg=k, heldout_auc=dict(all=a))) for k, a in [(8, 0.6), (16, 0.7), (24, 0.7), (32, 0.65)]) + '\n')
    assert td.best_auc(str(path)) == (0.7, 16)

def test_aot_pool_pairs_noise_per_class_and_keeps_it_standard_normal():
    gen_images = torch.Generator().manual_seed(0)
    real = (torch.randint(0, 256, [50, 1, 8, 8], generator=gen_images, dtype=torch.uint8), torch.arange(50) % 3)
    fake = (torch.randint(0, 256, [50, 1, 8, 8], generator=gen_images, dtype=torch.uint8), torch.arange(50) % 3)
    pools = {p: td.make_pool(real, fake, 32, torch.Generator().manual_seed(5), p) for p in (0, 32)}
    (x0, y0, tg0, z0, t0), (x1, y1, tg1, z1, t1) = pools[0], pools[32]
    assert torch.equal(x0, x1) and torch.equal(y0, y1) and torch.equal(tg0, tg1) and torch.equal(t0, t1)
    # The same noises, only permuted within the real half and the fake half, and lower total distance.
    assert torch.equal(z0.flatten(1).sum(1).sort().values, z1.flatten(1).sum(1).sort().values)
    images = x0.float() / 127.5 - 1
    for target in (0, 1):
        m = tg0 == target
        assert aot.pairing_cost(images[m], z1[m]) < aot.pairing_cost(images[m], z0[m])
        # Per class: the noises of a class's images are those drawn for that class, optimally paired.
        for c in range(3):
            mc = m & (y0 == c)
            assert torch.equal(z0[mc].flatten(1).sum(1).sort().values, z1[mc].flatten(1).sum(1).sort().values)
        best = aot.pairing_cost(images[m], z0[m], aot.assign(images[m], z0[m], y0[m])[0])
        assert abs(aot.pairing_cost(images[m], z1[m]) - best) <= 1e-6 * best
    assert tg0.sum() == 16

def test_nearest_of_keeps_each_images_nearest_noise(monkeypatch):
    gen_images = torch.Generator().manual_seed(0)
    real = (torch.randint(0, 256, [50, 1, 8, 8], generator=gen_images, dtype=torch.uint8), torch.arange(50) % 3)
    fake = (torch.randint(0, 256, [50, 1, 8, 8], generator=gen_images, dtype=torch.uint8), torch.arange(50) % 3)
    calls, nearest = [], aot.nearest
    monkeypatch.setattr(aot, 'nearest', lambda x, c: calls.append((x, c)) or nearest(x, c))
    x, y, target, z, t = td.make_pool(real, fake, 32, torch.Generator().manual_seed(5), 0, 4)
    # Every image of the pool has its own 4 candidates and keeps the nearest of them.
    assert [c.shape for _, c in calls] == [torch.Size([16, 4, 1, 8, 8])] * 2
    best = {}
    for images, candidates in calls:
        d = (candidates - images[:, None]).flatten(2).norm(dim=2)
        for image, row, i in zip(images, candidates, d.argmin(dim=1)):
            best.setdefault(image.numpy().tobytes(), []).append(row[i])
    images = x.float() / 127.5 - 1
    assert all(any(torch.equal(noise, b) for b in best[image.numpy().tobytes()]) for image, noise in zip(images, z))
    again = td.make_pool(real, fake, 32, torch.Generator().manual_seed(5), 0, 4)
    assert all(torch.equal(a, b) for a, b in zip((x, y, target, z, t), again)) # reproducible from the generator

@pytest.mark.slow
@pytest.mark.parametrize('case', ['no labels', 'resolution', 'pool', 'batch', 'nearest'])
def test_errors(case, data, tmp_path):
    args = {'no labels': ['--fakes', data['fake_nolabels'], '--cond=1'], 'resolution': ['--fakes', data['fake16']],
            'pool': ['--fakes', data['fake'], '--aot=12', '--batch=8'], 'batch': ['--fakes', data['fake'], '--batch=7'],
            'nearest': ['--fakes', data['fake'], '--aot=16', '--nearest-of=4']}[case]
    expected = {'no labels': 'no dataset.json (generate.py writes it', 'resolution': '--fakes images are [1, 16, 16]',
                'pool': 'multiple of the per-process batch 8', 'batch': 'multiple of 2', 'nearest': 'not with --aot'}[case]
    code, out, err = run(['--data', data['real'], '--outdir', str(tmp_path / 'out'), '--kimg=0.01', *args])
    lines = err.strip().splitlines()
    assert code != 0 and 'Traceback' not in err and lines[-1].startswith('Error:') and expected in lines[-1], err

def test_heldout_accuracy_is_balanced_and_auc_ignores_bias():
    # A discriminator that calls everything real is at chance, however many more real images there are.
    class Constant(torch.nn.Module):
        def forward(self, x, t, class_labels=None):
            return torch.ones(len(x))
    # One that ranks perfectly (brighter = more real) but calls everything real: accuracy at chance,
    # AUC 1 (its log-ratio gradient, what guidance uses, is informative all the same).
    class BiasedBrightness(torch.nn.Module):
        def forward(self, x, t, class_labels=None):
            return 0.75 + 0.2 * torch.tanh(x.flatten(1).mean(1))
    real = (torch.full([30, 1, 8, 8], 200, dtype=torch.uint8), None)
    fake = (torch.full([10, 1, 8, 8], 50, dtype=torch.uint8), None)
    acc, area = td.heldout_metrics(Constant(), real, fake, 'cpu')
    assert set(acc.values()) == {0.5} and set(area.values()) == {0.5}
    acc, area = td.heldout_metrics(BiasedBrightness(), real, fake, 'cpu')
    assert set(acc.values()) == {0.5} and area['t<0.2'] == 1 and area['all'] > 0.75 # noise hides brightness at large t
    assert td.auc(np.array([0.1, 0.2]), np.array([0.3, 0.4])) == 0 and td.auc(np.array([1, 3]), np.array([2, 2])) == 0.5

@pytest.mark.slow
def test_two_ranks_small_extractor(data, tmp_path):
    # Every trainable parameter must get a gradient each step: DDP (here gloo on 2 CPU processes)
    # stops at the second step otherwise. Without --classifier the encoder is trained with the head.
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', 'train_discriminator.py',
           '--data', data['real'], '--fakes', data['fake'], '--cond=1', '--batch=8', '--kimg=0.032', '--outdir', str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, text=True, capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    stats = [json.loads(line) for line in open(tmp_path / 'stats.jsonl')]
    assert [s['kimg'] for s in stats] == [0.032] # 4 steps of 8 images, 4 on each rank
    disc = guidance.load_discriminator(str(tmp_path / 'discriminator.safetensors'), verbose=False)
    assert disc.extractor == 'small' and disc.label_dim == 4

@pytest.mark.slow
def test_resume_of_run_that_trained_the_unused_output_pool(data, tmp_path):
    # Such runs (before the fix of the DDP crash) gave Adam the small encoder's output pool too, last among its layers.
    torch.manual_seed(0)
    old = with_output_pool(guidance.Discriminator(8, 1, label_dim=4, extractor='small'))
    opt = torch.optim.Adam(old.parameters(), lr=3e-4, weight_decay=1e-7)
    old(torch.randn([4, 1, 8, 8]), torch.rand([4]), torch.tensor([0, 1, 2, 3])).sum().backward()
    opt.step()
    (tmp_path / 'out').mkdir()
    gen = [torch.Generator().manual_seed(1).get_state()]
    torch.save(dict(disc=old.state_dict(), opt=opt.state_dict(), step=4, gen=gen), tmp_path / 'out' / 'training-state.pt')
    code, out, err = run(['--data', data['real'], '--fakes', data['fake'], '--cond=1', '--batch=8', '--kimg=0.064', '--outdir', str(tmp_path / 'out')])
    assert code == 0 and 'Resuming from' in out and 'at 0.032 kimg' in out, out + err

    # Each remaining parameter keeps its own Adam moments.
    new = guidance.Discriminator(8, 1, label_dim=4, extractor='small')
    names = [n for n, _ in new.named_parameters()]
    new_opt = torch.optim.Adam(new.parameters())
    new_opt.load_state_dict(td.renumber_optimizer_state(opt.state_dict(), list(old.state_dict()), names))
    old_params = dict(old.named_parameters())
    for name, p in new.named_parameters():
        assert torch.equal(new_opt.state[p]['exp_avg'], opt.state[old_params[name]]['exp_avg']), name
