"""Training gradients equal to EDM's (tests/golden/grads, see README.md there): the default fp32
path computes EDM's forward and backward with the same operations, so under the golden kernels
(helpers.PINNED_KERNELS) every value is bit for bit EDM's. Other kernels sum in another order:
seen on AVX-512 and with vectorisation off, at most 7e-8 of the output's largest value and 3e-6 of
a gradient tensor's; the tolerances below leave an order of magnitude on top for other CPUs."""

import json
import os

import numpy as np
import pytest

from training import networks
from tests import edm_reference
from tests.helpers import assert_golden

GOLDEN = os.path.join(os.path.dirname(__file__), 'golden', 'grads')
with open(os.path.join(GOLDEN, 'README.json')) as f:
    META = json.load(f)['networks']

def test_all_cases_present():
    assert sorted(META) == ['adm_edm', 'ddpmpp_edm', 'ncsnpp_ve']

@pytest.mark.golden
@pytest.mark.parametrize('name', sorted(META))
def test_golden_gradients(name, one_thread):
    meta = META[name]
    D, net, data = edm_reference.gradient_case(networks, name, meta)
    assert_golden(D, data['out'], atol=1e-6 * np.abs(data['out']).max(), what=f'{name}: output')
    params = dict(net.named_parameters())
    assert sorted(k[len('grad/'):] for k in data.files if k.startswith('grad/')) == sorted(set(params) - set(meta['params_without_grad']))
    for key, p in params.items():
        if key in meta['params_without_grad']:
            assert p.grad is None, key
        else:
            ref = data['grad/' + key]
            assert p.grad is not None, key
            assert_golden(p.grad, ref, atol=3e-5 * np.abs(ref).max(), what=f'{name}: gradient of {key}')
