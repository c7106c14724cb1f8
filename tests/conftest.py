"""Suite-wide settings. The networks in the tests are tiny: one thread per process is as fast
as two and, on a loaded 2-core machine, many times faster (OpenMP barriers wait for descheduled
threads). Subprocesses started by the tests get OMP_NUM_THREADS=1 for the same reason."""

import os

import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault('OMP_NUM_THREADS', '1')

@pytest.fixture(scope='module')
def one_thread():
    """One torch thread even where a test or the caller changed it: golden references ran on one
    thread (more threads may split reductions differently)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
