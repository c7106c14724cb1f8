"""OT-start sampling: ODE targets against a closed form, the sampler = Heun from the picked target,
honest NFE, batch independence, labels of conditional networks, tools/ot_map.py, the study's checks."""

import os
import re

import pytest
import torch
from click.testing import CliRunner

from bench import ot_start_study
from training.testdata import load_golden_network, make_dataset
from tests.helpers import GaussianDenoiser
from sampling import ot_start as so
from sampling.denoisers import MinBatchNet, NFECounter
from sampling.edm import edm_sampler
from sampling.seeds import latents_for_seeds
from training.network_io import save_safe
from tools import ot_map as ot_map_tool

@pytest.fixture(scope='module')
def uncond():
    return load_golden_network('networks/ddpmpp_edm_uncond.npz', 'networks/ddpmpp_edm_uncond.json')

@pytest.fixture(scope='module')
def cond():
    return load_golden_network('networks/ddpmpp_edm_cond.npz', 'networks/ddpmpp_edm_cond.json')

def random_map(m=5, sigma_T=2.0, labels=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    return so.OTMap(torch.randn(m, 3, 16, 16, generator=g) * (0.5 + sigma_T), torch.randn(m, generator=g, dtype=torch.float64) * 10,
                    sigma_T, 'data', labels=labels)

def test_ode_states_follow_the_exact_ode():
    net = GaussianDenoiser()
    latents = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    counter = NFECounter(net)
    x = so.ode_states(counter, latents, None, sigma_T=2.0, num_steps=64)
    s = net.sigma_data
    exact = latents.double() * 80 * ((s ** 2 + 2.0 ** 2) / (s ** 2 + 80 ** 2)) ** 0.5
    assert torch.allclose(x, exact, rtol=1e-4)
    assert counter.nfe == 2 * (64 - 1) and counter.sigmas[-1] == pytest.approx(2.0)

def test_sampler_is_heun_from_the_picked_target(uncond):
    ot_map = random_map()
    latents, _, _ = latents_for_seeds(uncond, [0, 1, 2, 3])
    counter = NFECounter(uncond)
    with torch.no_grad():
        images, index = so.ot_start_sampler(counter, latents, ot_map, num_steps=3, return_index=True)
        expected = edm_sampler(uncond, ot_map.targets[index].double() / 2.0, num_steps=3, sigma_max=2.0)
    brute = (latents.flatten(1).double() @ ot_map.targets.flatten(1).double().T + ot_map.h).argmax(1)
    assert torch.equal(index, brute)
    assert torch.equal(images, expected)
    assert counter.nfe == 5 and max(counter.sigmas) == pytest.approx(2.0) # 2N-1, nothing above sigma_T

def test_seed_gives_same_image_in_any_batch(uncond):
    ot_map = random_map(m=7)
    run = lambda seeds: so.ot_start_sampler(MinBatchNet(uncond), latents_for_seeds(uncond, seeds)[0], ot_map, num_steps=2)
    with torch.no_grad():
        together = run([0, 1, 2, 3, 4])
        alone = torch.cat([run([s]) for s in [0, 1, 2, 3, 4]])
    assert torch.equal(together, alone)

def test_conditional_network_gets_the_targets_labels(cond):
    labels = torch.eye(10)[[3, 1, 4, 1, 5]]
    ot_map = random_map(labels=labels)
    latents, class_labels, _ = latents_for_seeds(cond, [0, 1, 2])
    with torch.no_grad():
        images, index = so.ot_start_sampler(cond, latents, ot_map, num_steps=2, return_index=True)
        expected = edm_sampler(cond, ot_map.targets[index].double() / 2.0, labels[index], num_steps=2, sigma_max=2.0)
    assert torch.equal(images, expected)
    with pytest.raises(ValueError, match='no labels'):
        so.ot_start_sampler(cond, latents, random_map(), num_steps=2)
    with pytest.raises(ValueError, match='set by the OT map'):
        so.ot_start_sampler(cond, latents, ot_map, num_steps=2, sigma_max=5)

def test_data_targets_add_seeded_noise():
    images = torch.rand(50, 1, 8, 8) * 2 - 1
    y = so.data_targets(images, 3.0, seed=5)
    assert torch.equal(y, so.data_targets(images, 3.0, seed=5))
    noise = (y - images) / 3.0
    assert abs(float(noise.mean())) < 0.05 and float(noise.std()) == pytest.approx(1, abs=0.05)

#----------------------------------------------------------------------------
# tools/ot_map.py

@pytest.fixture(scope='module')
def files(tmp_path_factory, uncond, cond):
    d = tmp_path_factory.mktemp('otmap')
    save_safe(uncond, d / 'uncond.safetensors')
    save_safe(cond, d / 'cond.safetensors')
    random_map(labels=torch.eye(10)[:5]).save(d / 'cond-map.safetensors')
    return dict(net=str(d / 'uncond.safetensors'), cond=str(d / 'cond.safetensors'), cond_map=str(d / 'cond-map.safetensors'), data=make_dataset(d / 'data', n=12, res=16, channels=3),
                small=make_dataset(d / 'small', n=4, res=8, channels=3), dir=d)

def test_cli_data_and_ode_maps(files, uncond):
    runner = CliRunner()
    out = str(files['dir'] / 'data.safetensors')
    r = runner.invoke(ot_map_tool.main, ['--network', files['net'], '--source=data', '--data', files['data'],
                                         '--sigma-T=1.5', '--fit-steps=20', '--out', out])
    assert r.exit_code == 0, r.output
    m = so.OTMap.load(out)
    assert (m.source, m.sigma_T, len(m), m.labels) == ('data', 1.5, 12, None)
    assert 'DATA-DEPENDENT' in m.meta['targets_from'] and m.meta['nfe_total'] == 0 and m.meta['fit']['eval_samples'] == 600
    images, _, _ = ot_map_tool.load_images(files['data'], uncond, None)
    assert torch.equal(m.targets, so.data_targets(images, 1.5, 0))

    out = str(files['dir'] / 'ode.safetensors')
    r = runner.invoke(ot_map_tool.main, ['--network', files['net'], '--source=ode', '--targets=3', '--target-steps=3',
                                         '--first-seed=7', '--sigma-T=5', '--fit-steps=5', '--out', out])
    assert r.exit_code == 0, r.output
    m = so.OTMap.load(out)
    assert m.source == 'ode' and m.target_ids.tolist() == [7, 8, 9]
    assert (m.meta['nfe_per_target'], m.meta['nfe_total']) == (4, 12)
    latents, _, _ = latents_for_seeds(uncond, [7, 8, 9])
    with torch.no_grad():
        assert torch.allclose(m.targets, so.ode_states(uncond, latents, None, 5.0, 3).float())

@pytest.mark.parametrize('args, message', [
    (['--source=data', '--data', '{small}'], '3x8x8 images.*network makes 3x16x16'),
    (['--source=data'], '--data is needed'),
    (['--source=ode', '--data', '{data}'], '--data is needed'),
    (['--source=ode', '--network', '{dir}/missing.pkl'], 'Cannot load network'),
])
def test_cli_bad_input(files, args, message):
    args = [a.format(**files) for a in args]
    base = [] if '--network' in args else ['--network', files['net']]
    r = CliRunner().invoke(ot_map_tool.main, [*base, *args, '--sigma-T=1', '--out', str(files['dir'] / 'bad.safetensors')])
    assert r.exit_code != 0 and isinstance(r.exception, SystemExit) # a message, not a traceback
    errors = [line for line in r.output.splitlines() if line.startswith('Error')]
    assert len(errors) == 1 and re.search(message, errors[0]), r.output

#----------------------------------------------------------------------------
# The study's checks.

def test_memorisation_and_mode_mixture():
    train = torch.zeros(3, 1, 2, 2)
    train[1] += 1
    train[2] -= 1
    copy = train[1:2] + 0.01            # next to one training image: ratio 0.02 / 2.02
    between = torch.full([1, 1, 2, 2], 0.5) # equally far from 0 and 1: ratio 1
    assert ot_start_study.nearest_ratio(torch.cat([copy, between]), train).tolist() == pytest.approx([0.02 / 2.02, 1.0])
    assert ot_start_study.memorisation_rate(torch.cat([copy, between, -copy]), train) == pytest.approx(2 / 3)
    assert ot_start_study.nearest(torch.cat([copy, -copy]), train)[1].tolist() == [1, 2]

    class Logits(torch.nn.Module):
        def forward(self, x):
            return x.flatten(1)
    sure, mixed = torch.tensor([[5.0, 0, 0, 0]]), torch.tensor([[1.0, 1.0, 0, 0]])
    assert ot_start_study.mode_mixture_rate(Logits(), torch.cat([sure, mixed, mixed]).reshape(3, 1, 2, 2)) == pytest.approx(2 / 3)

#----------------------------------------------------------------------------
# generate.py --ot-map

def run_generate(*args):
    import subprocess, sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.run([sys.executable, 'generate.py', *args], cwd=root, text=True, capture_output=True, timeout=300)

@pytest.mark.slow
def test_generate_with_ot_map(files, uncond):
    import numpy as np, PIL.Image
    from sampling.images import to_uint8
    ot_map = random_map(m=6, sigma_T=3.0)
    ot_map.meta.update(targets_from='test targets', nfe_total=120)
    path = str(files['dir'] / 'gen-map.safetensors')
    ot_map.save(path)
    outdir = files['dir'] / 'gen'
    r = run_generate('--network', files['net'], '--ot-map', path, '--outdir', str(outdir), '--seeds=0-5', '--batch=4', '--steps=3', '--device=cpu')
    assert r.returncode == 0, r.stderr
    assert '5 NFE per image' in r.stdout and '120 NFE, 20.00 per image' in r.stdout
    latents, _, _ = latents_for_seeds(uncond, list(range(6)))
    with torch.no_grad():
        expected = to_uint8(so.ot_start_sampler(MinBatchNet(uncond), latents, ot_map, num_steps=3))
    for seed in range(6):
        assert np.array_equal(np.array(PIL.Image.open(outdir / f'{seed:06d}.png')), expected[seed]), seed

@pytest.mark.slow
@pytest.mark.parametrize('extra, message', [
    (['--network={cond}', '--ot-map={cond_map}', '--class=1'], '--class cannot be combined'),
    (['--network={cond}'], 'conditional.*no labels'),
    (['--sigma_max=5'], 'drop --sigma_max'),
    (['--disc=vp'], 'drop --disc'),
    (['--ot-map={small_map}'], '3x8x8 targets.*3x16x16 images'),
    (['--ot-map={net}'], 'not an OT map'),
])
def test_generate_ot_map_bad_input(files, extra, message):
    small = str(files['dir'] / 'small-map.safetensors')
    so.OTMap(torch.zeros(2, 3, 8, 8), torch.zeros(2), 1.0, 'data').save(small)
    good = str(files['dir'] / 'good-map.safetensors')
    random_map().save(good)
    extra = [e.format(small_map=small, **files) for e in extra]
    args = extra if any(e.startswith('--ot-map') for e in extra) else ['--ot-map', good, *extra]
    args = args if any(e.startswith('--network') for e in args) else ['--network', files['net'], *args]
    r = run_generate(*args, '--outdir', str(files['dir'] / 'bad'), '--seeds=0', '--device=cpu')
    assert r.returncode != 0 and 'Traceback' not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith('Error')]
    assert len(errors) == 1 and re.search(message, errors[0]), r.stderr
