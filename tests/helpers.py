"""Helpers shared by the test modules (plain functions; fixtures live in conftest.py)."""

import os
import platform

import numpy as np
import torch

#----------------------------------------------------------------------------
# Comparisons with tests/golden.
#
# The golden vectors were made on the CPU with torch's AVX2 kernels, oneDNN and MKL capped at AVX2.
# Other kernels (AVX-512, no vectorisation, ARM) round float32 differently in the last bits: a
# reduction splits otherwise, a vectorised exp or log (torch.randn's Box-Muller included) is another
# approximation. So the promise is two-fold: under PINNED_KERNELS the golden values come out bit for
# bit; on any other kernels they agree within the tolerance each test states with its reason.
# test_exactness.py reruns the golden tests (marker `golden`) in a subprocess under the pin.

PINNED_KERNELS = {'ATEN_CPU_CAPABILITY': 'avx2', 'ONEDNN_MAX_CPU_ISA': 'AVX2', 'MKL_ENABLE_INSTRUCTIONS': 'AVX2'}

def kernels_pinned():
    """True when this process runs the kernels that made tests/golden: golden values must then be
    met exactly."""
    return all(os.environ.get(key) == val for key, val in PINNED_KERNELS.items()) and \
        torch.backends.cpu.get_cpu_capability() == 'AVX2'

def pinning_unavailable():
    """Why the golden kernels cannot be pinned on this machine (None if they can): AVX2 kernels need
    an x86-64 CPU with AVX2 and FMA."""
    if platform.machine().lower() not in ('x86_64', 'amd64'):
        return f'the golden kernels are x86 AVX2 ones; this is {platform.machine()}'
    try:
        with open('/proc/cpuinfo') as f:
            flags = next((line.split(':', 1)[1].split() for line in f if line.startswith('flags')), [])
    except OSError:
        return 'cannot read /proc/cpuinfo to see whether the CPU has AVX2'
    if not {'avx2', 'fma'} <= set(flags):
        return 'this CPU lacks AVX2 or FMA, which the golden kernels use'
    return None

def assert_golden(actual, expected, atol, rtol=0.0, what=''):
    """actual equals the golden `expected` bit for bit under the pinned kernels, and within
    |actual - expected| <= atol + rtol * |expected| on any other kernels."""
    actual = actual.detach().cpu().numpy() if isinstance(actual, torch.Tensor) else np.asarray(actual)
    if kernels_pinned():
        np.testing.assert_array_equal(actual, expected, err_msg=f'{what} (pinned kernels: bit for bit)')
    else:
        np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol, err_msg=what)
