"""Training gradients bit for bit equal to EDM's (tests/golden/grads, see README.md there):
the default fp32 path computes EDM's forward and backward with the same operations."""

import json
import os

import numpy as np
import pytest
import torch

from training import networks

GOLDEN = os.path.join(os.path.dirname(__file__), 'golden', 'grads')
with open(os.path.join(GOLDEN, 'README.json')) as f:
    META = json.load(f)['networks']

def test_all_cases_present():
    assert sorted(META) == ['adm_edm', 'ddpmpp_edm', 'ncsnpp_ve']

@pytest.mark.parametrize('name', sorted(META))
def test_golden_gradients(name, one_thread):
    meta = META[name]
    data = np.load(os.path.join(GOLDEN, f'{name}.npz'), allow_pickle=False)
    net = getattr(networks, meta['precond'])(**meta['constructor_kwargs'])
    net.load_state_dict({k[len('state/'):]: torch.from_numpy(data[k]) for k in data.files if k.startswith('state/')}, strict=True)
    net.train()
    y, n, sigma = (torch.from_numpy(data[k]) for k in ('y', 'n', 'sigma'))
    labels, augment_labels = (torch.from_numpy(data[k]) if k in data.files else None for k in ('class_labels', 'augment_labels'))

    D = net(y + n * sigma[:, None, None, None], sigma, labels, augment_labels=augment_labels)
    w = (sigma ** 2 + 0.25) / (sigma * 0.5) ** 2
    (w[:, None, None, None] * (D - y) ** 2).sum().backward()

    assert np.array_equal(D.detach().numpy(), data['out'])
    params = dict(net.named_parameters())
    assert sorted(k[len('grad/'):] for k in data.files if k.startswith('grad/')) == sorted(set(params) - set(meta['params_without_grad']))
    for key, p in params.items():
        if key in meta['params_without_grad']:
            assert p.grad is None, key
        else:
            assert p.grad is not None and np.array_equal(p.grad.numpy(), data['grad/' + key]), f'{name}: gradient of {key} differs'
