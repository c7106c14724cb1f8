"""Suite-wide settings. The networks in the tests are tiny: one thread per process is as fast
as two and, on a loaded 2-core machine, many times faster (OpenMP barriers wait for descheduled
threads). Subprocesses started by the tests get OMP_NUM_THREADS=1 for the same reason."""

import os
import pickle
import subprocess
import sys
import tempfile

import pytest
import torch

from training.network_io import save_safe
from training.testdata import load_golden_network

torch.set_num_threads(1)
os.environ.setdefault('OMP_NUM_THREADS', '1')

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def pytest_sessionstart(session):
    """Many tests start programs in fresh interpreters, which import the installed copy of the
    repository (pip install -e .): it must be this checkout, or they would test another one."""
    code = 'import importlib.util; spec = importlib.util.find_spec("fid"); print(spec.origin if spec else "")'
    found = subprocess.run([sys.executable, '-c', code], cwd=tempfile.gettempdir(), capture_output=True, text=True).stdout.strip()
    if not found or os.path.realpath(found) != os.path.realpath(os.path.join(ROOT, 'fid.py')):
        pytest.exit(f'run "pip install -e ." in {ROOT} first: fresh interpreters import {found or "no fid.py"} '
                    f'(the tests start the programs in fresh processes)', returncode=4)

@pytest.fixture(scope='module')
def one_thread():
    """One torch thread even where a test or the caller changed it: golden references ran on one
    thread (more threads may split reductions differently)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

@pytest.fixture(scope='module')
def nets(tmp_path_factory):
    """The conditional golden network as an EDM-style snapshot pickle and in the safe format,
    and the unconditional one as a pickle."""
    d = tmp_path_factory.mktemp('nets')
    cond = load_golden_network('networks/ddpmpp_edm_cond.npz', 'networks/ddpmpp_edm_cond.json')
    uncond = load_golden_network('networks/ddpmpp_edm_uncond.npz', 'networks/ddpmpp_edm_uncond.json')
    for name, net in [('cond', cond), ('uncond', uncond)]:
        with open(d / f'{name}.pkl', 'wb') as f:
            pickle.dump(dict(ema=net, loss_fn=None, augment_pipe=None, dataset_kwargs={}), f)
    save_safe(cond, d / 'cond.safetensors')
    return dict(net=cond, pkl=str(d / 'cond.pkl'), safe=str(d / 'cond.safetensors'), uncond=str(d / 'uncond.pkl'))
