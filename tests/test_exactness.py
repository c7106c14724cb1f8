"""EDM's numerics bit for bit, where that promise can be checked (see tests/helpers.py):

- against EDM's own code on this machine (EDM_SOURCE: a checkout of NVlabs/edm): training
  gradients, the networks' outputs and the samplers' images must be identical bits;
- against the golden files under the kernels that made them (helpers.PINNED_KERNELS), on the kind
  of CPU that made them: every `golden` test is rerun in a subprocess and must match exactly.

Everywhere else the golden tests' tolerances apply."""

import os
import platform
import subprocess
import sys

import numpy as np
import pytest

from tests import edm_reference
from tests.helpers import PINNED_KERNELS, kernels_pinned, pinning_unavailable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EDM_SOURCE = os.environ.get('EDM_SOURCE')

def cpu_vendor():
    try:
        with open('/proc/cpuinfo') as f:
            return next((line.split(':', 1)[1].strip() for line in f if line.startswith('vendor_id')), platform.processor())
    except OSError:
        return platform.processor()

# The golden files were made on an AMD EPYC with AVX2. Under the pin they come out bit for bit on AMD
# EPYCs with AVX-512 too; on an Intel Xeon they do not (MKL and oneDNN take vendor-specific paths that
# the pin does not reach), so there the check is skipped and the tolerances apply.
GOLDEN_VENDOR = 'AuthenticAMD'

@pytest.mark.slow
@pytest.mark.skipif(EDM_SOURCE is None, reason='set EDM_SOURCE to a checkout of NVlabs/edm to compare with its code on this machine')
def test_same_bits_as_edm_on_this_machine(tmp_path):
    from sampling import edm as samplers
    from training import networks
    out = tmp_path / 'edm.npz'
    env = dict(os.environ, PYTHONPATH=EDM_SOURCE, OMP_NUM_THREADS='1')
    subprocess.run([sys.executable, os.path.join(ROOT, 'tests', 'edm_reference.py'), str(out)], env=env, check=True, cwd=EDM_SOURCE)
    edm = np.load(out)
    ours = edm_reference.compute(networks, samplers)
    assert sorted(ours) == sorted(edm.files)
    differ = [key for key in ours if not np.array_equal(ours[key], edm[key])]
    assert not differ, f'{len(differ)} of {len(ours)} arrays differ from EDM\'s on this machine, e.g. {differ[:5]}'

@pytest.mark.slow
def test_golden_bit_for_bit_under_pinned_kernels():
    if kernels_pinned():
        pytest.skip('already running under the pinned kernels')
    reason = pinning_unavailable()
    if reason:
        pytest.skip(reason)
    if cpu_vendor() != GOLDEN_VENDOR:
        pytest.skip(f'the golden files reproduce bit for bit on {GOLDEN_VENDOR} CPUs; this is {cpu_vendor()} (tolerances apply)')
    env = dict(os.environ, **PINNED_KERNELS, OMP_NUM_THREADS='1')
    result = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', '-m', 'golden', 'tests'],
                            cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:]
