"""sampling/ot_start.py: assignment, potentials with known answers, convergence, safe save/load."""

import math

import pytest
import scipy.stats
import torch

from sampling import ot_start as so

def test_assign_is_argmax_in_any_batch_and_chunk():
    g = torch.Generator().manual_seed(0)
    z, y, h = torch.randn(200, 5, generator=g), torch.randn(30, 5, generator=g), torch.randn(30, generator=g)
    expected = (z @ y.T + h).argmax(dim=1)
    assert torch.equal(so.assign(z, y, h), expected)
    assert torch.equal(so.assign(z, y, h, batch=7, chunk=4), expected)
    ot_map = so.OTMap(y.reshape(30, 5, 1, 1), h.double(), 1.0, 'data')
    latents = z.reshape(200, 5, 1, 1)
    batched = ot_map.assign(latents)
    assert torch.equal(torch.cat([ot_map.assign(latents[i:i + 1]) for i in range(200)]), batched)
    assert torch.equal(batched, expected)

def test_symmetric_pair_gets_equal_potentials():
    y = torch.tensor([[1.0, 2.0, 0.5], [-1.0, -2.0, -0.5]])
    h, report = so.fit_potentials(y, steps=100, samples_per_step=4000, eval_samples=40000)
    assert abs(float(h[0] - h[1])) < 0.05 * float(y[0].norm())
    assert report['max_relative_deviation'] < 0.05

def test_three_collinear_targets_known_potentials():
    # Cells of -e1, 0, e1 split z1 at h0 - h1 and h1 - h2; thirds of N(0, 1) need h1 - h0 = h1 - h2 = Phi^-1(2/3).
    y = torch.tensor([[-1.0, 0.0], [0.0, 0.0], [1.0, 0.0]])
    h, report = so.fit_potentials(y, steps=300, samples_per_step=6000, eval_samples=60000, lr=0.1)
    q = scipy.stats.norm.ppf(2 / 3)
    assert float(h[1] - h[0]) == pytest.approx(q, abs=0.03)
    assert float(h[1] - h[2]) == pytest.approx(q, abs=0.03)
    assert report['max_relative_deviation'] < 0.06

def test_cell_masses_converge_to_uniform():
    g = torch.Generator().manual_seed(1)
    y = torch.randn(16, 8, generator=g) * torch.linspace(0.5, 3, 16)[:, None] # unequal norms: h = 0 is far off
    start = so.mass_report(so.cell_masses(y, torch.zeros(16, dtype=torch.float64), 50000, g), 50000)
    assert start['max_relative_deviation'] > 1
    h, report = so.fit_potentials(y, steps=150, samples_per_step=8000, eval_samples=100000)
    assert report['max_relative_deviation'] < 4 * report['sampling_noise_relative'] < 0.2
    assert report['empty_cells'] == 0 and report['eval_samples'] == 100000
    assert float(h.mean()) == pytest.approx(0, abs=1e-9)

def test_mass_report():
    r = so.mass_report(torch.tensor([0.5, 0.25, 0.25, 0.0], dtype=torch.float64), 100)
    assert r['max_mass_deviation'] == pytest.approx(0.25) and r['max_relative_deviation'] == pytest.approx(1.0)
    assert r['empty_cells'] == 1 and r['sampling_noise_relative'] == pytest.approx(math.sqrt(0.75 * 4 / 100))

def test_bad_input():
    with pytest.raises(ValueError, match='at least 2 targets'):
        so.fit_potentials(torch.zeros(1, 3))
    with pytest.raises(ValueError, match='NaN'):
        so.fit_potentials(torch.tensor([[0.0], [math.nan]]))
    with pytest.raises(ValueError, match='unknown target source'):
        so.OTMap(torch.zeros(2, 1, 1, 1), torch.zeros(2), 1.0, 'test')

#----------------------------------------------------------------------------

def small_map(labels=True):
    g = torch.Generator().manual_seed(2)
    return so.OTMap(torch.randn(6, 3, 4, 4, generator=g), torch.randn(6, generator=g, dtype=torch.float64), 2.5, 'ode',
                    labels=torch.eye(3)[[0, 1, 2, 0, 1, 2]] if labels else None, target_ids=[10, 11, 12, 13, 14, 15],
                    meta=dict(network='net.pkl', nfe_per_target=22, fit=dict(max_relative_deviation=0.1)))

def test_save_load_roundtrip(tmp_path):
    m = small_map()
    m.save(tmp_path / 'map.safetensors')
    back = so.OTMap.load(tmp_path / 'map.safetensors')
    for key in ('targets', 'h', 'labels', 'target_ids'):
        assert torch.equal(getattr(back, key), getattr(m, key)), key
    assert (back.sigma_T, back.source, back.meta) == (2.5, 'ode', m.meta)
    assert not list(tmp_path.glob('*.tmp*'))

def test_load_rejects_other_files(tmp_path):
    import safetensors.torch
    safetensors.torch.save_file({'x': torch.zeros(2)}, tmp_path / 'other.safetensors')
    with pytest.raises(IOError, match='not an OT map'):
        so.OTMap.load(tmp_path / 'other.safetensors')
    (tmp_path / 'junk.safetensors').write_bytes(b'not a safetensors file')
    with pytest.raises(IOError, match='Cannot read OT map'):
        so.OTMap.load(tmp_path / 'junk.safetensors')

class FakeNet:
    img_channels, img_resolution, label_dim, sigma_max = 3, 4, 3, 80.0

def test_check_network():
    small_map().check_network(FakeNet())
    wrong = FakeNet(); wrong.img_resolution = 8
    with pytest.raises(ValueError, match='3x4x4 targets.*3x8x8 images'):
        small_map().check_network(wrong)
    with pytest.raises(ValueError, match='conditional.*no labels'):
        small_map(labels=False).check_network(FakeNet())
    low = FakeNet(); low.sigma_max = 1.0
    with pytest.raises(ValueError, match='above the network'):
        small_map().check_network(low)
