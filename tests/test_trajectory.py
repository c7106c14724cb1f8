"""tools/trajectory.py: exact zero error at the reference step count, convergence on a smooth toy,
straight paths measured as straight, the CLI's outputs and its one-line error for a bad network."""

import json
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from training import networks
from training.network_io import save_safe
from tools import trajectory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, 'tests', 'golden', 'networks')

pytestmark = pytest.mark.usefixtures('one_thread')

def golden_net():
    with open(os.path.join(GOLDEN, 'ddpmpp_edm_cond.json')) as f:
        meta = json.load(f)
    data = np.load(os.path.join(GOLDEN, 'ddpmpp_edm_cond.npz'))
    net = networks.EDMPrecond(**meta['constructor_kwargs'])
    net.load_state_dict({k[len('state/'):]: torch.from_numpy(data[k]) for k in data.files if k.startswith('state/')}, strict=True)
    return net.eval().requires_grad_(False)

class MixtureDenoiser(torch.nn.Module):
    """Exact denoiser of data drawn from equal-weight Gaussians N(m_k, s^2 I), m_k = means[k] * ones.
    A smooth ODE; with one component its paths are straight lines through m, with two they bend
    towards the component they end in."""
    def __init__(self, means=(0.0,), s=0.5, res=4, channels=1):
        super().__init__()
        self.means, self.s = means, s
        self.img_resolution, self.img_channels, self.label_dim = res, channels, 0
        self.sigma_min, self.sigma_max = 0, float('inf')

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def forward(self, x, sigma, class_labels=None):
        var = self.s ** 2 + torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1, 1, 1) ** 2
        logp = torch.stack([-((x - m) ** 2).sum(dim=[1, 2, 3], keepdim=True) / (2 * var) for m in self.means])
        weights = logp.softmax(dim=0)
        return sum(w * (self.s ** 2 * x + (var - self.s ** 2) * m) / var for w, m in zip(weights, self.means))

def test_zero_error_at_reference_steps_on_golden_net():
    res = trajectory.analyze(golden_net(), seeds=[0, 1, 2], nfes=[5, 15], ref_steps=8, progress=False)
    errors = {r['nfe']: r['error']['mean'] for r in res['runs']}
    assert errors[15] == 0 # 8 steps = 15 NFE: the same computation as the reference
    assert errors[5] > 0
    assert len(res['reference']['profile']['sigma']) == 8

def test_error_decreases_with_nfe_on_smooth_toy():
    res = trajectory.analyze(MixtureDenoiser(means=(-0.5, 0.5), s=0.3), seeds=list(range(8)), nfes=[3, 5, 9, 17, 33], ref_steps=128, progress=False)
    errors = [r['error']['mean'] for r in res['runs']]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < errors[0] / 20 # second order: much smaller, not just smaller

def test_straight_paths_measure_straight():
    straight = trajectory.analyze(MixtureDenoiser(means=(0.7,)), seeds=[0, 1], nfes=[5], ref_steps=32, progress=False)
    curved = trajectory.analyze(MixtureDenoiser(means=(-0.5, 0.5), s=0.1), seeds=[0, 1], nfes=[5], ref_steps=32, progress=False)
    assert straight['reference']['deviation']['mean'] < 1e-6 and straight['reference']['turn']['mean'] < 1e-6
    assert curved['reference']['deviation']['mean'] > 1e-3 and curved['reference']['turn']['mean'] > 1e-3

def run_cli(*args):
    # In-process (click's runner): a subprocess per case would spend most of its time importing torch.
    result = CliRunner().invoke(trajectory.main, list(args))
    result.returncode = result.exit_code
    return result

def test_cli_writes_outputs(tmp_path):
    net_path = str(tmp_path / 'golden.safetensors')
    save_safe(golden_net(), net_path)
    out = tmp_path / 'out'
    r = run_cli(f'--network={net_path}', f'--network={net_path}', '--name=a', '--name=b', f'--outdir={out}',
                '--seeds=0-2', '--nfe=3,5', '--ref-steps=6', '--device=cpu')
    assert r.returncode == 0, r.output
    assert sorted(os.listdir(out)) == ['curvature.png', 'error_vs_nfe.png', 'strip.png', 'trajectory.csv', 'trajectory.json']
    doc = json.loads((out / 'trajectory.json').read_text())
    assert set(doc['networks']) == {'a', 'b'} and [r['nfe'] for r in doc['networks']['a']['runs']] == [3, 5]
    assert doc['networks']['a'] == doc['networks']['b'] # same network, same latents
    assert len((out / 'trajectory.csv').read_text().splitlines()) == 1 + 2 * 3
    for png in ('curvature.png', 'error_vs_nfe.png', 'strip.png'):
        assert (out / png).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'

@pytest.mark.parametrize('content', [None, b'not a network'])
def test_cli_bad_network_is_one_line_error(tmp_path, content):
    path = tmp_path / 'bad.pkl'
    if content is not None:
        path.write_bytes(content)
    r = run_cli(f'--network={path}', f'--outdir={tmp_path / "out"}', '--seeds=0', '--nfe=3', '--ref-steps=4', '--device=cpu')
    assert r.returncode != 0
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith('Error: Cannot load network'), r.stderr
    assert r.exception is None or isinstance(r.exception, SystemExit)
    assert not (tmp_path / 'out').exists()

def test_cli_rejects_even_nfe(tmp_path):
    r = run_cli('--network=x.pkl', f'--outdir={tmp_path}', '--nfe=4')
    assert r.returncode != 0 and 'not a Heun budget' in r.stderr
