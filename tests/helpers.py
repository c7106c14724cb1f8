"""Helpers that several test modules share: plain functions and constants (shared fixtures are in
conftest.py). Test modules import from here, never from one another."""

import functools
import glob
import json
import os
import platform
import subprocess
import sys

import numpy as np
import PIL.Image
import torch

from training import guidance, networks
from training.testdata import load_golden_network

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def python_with_only(pythonpath):
    """(command, environment) of a fresh interpreter that sees the installed packages (torch, numpy,
    ...) and pythonpath, and not this repository even where it is installed with pip install -e .:
    -S skips the .pth files that put it on the path; the site-packages folders come in through
    PYTHONPATH instead."""
    import site
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    env['PYTHONPATH'] = os.pathsep.join([str(pythonpath), *site.getsitepackages()])
    return [sys.executable, '-S'], env

#----------------------------------------------------------------------------
# train.py runs (tests/test_train.py and the tests of what training writes).

TINY = ['--cbase=8', '--cres=1,1', '--batch=16', '--tick=0.032', '--seed=0', '--grid=4', '--workers=0']

def run_train(args, torchrun=0, check=True):
    cmd = [sys.executable] + (['-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={torchrun}'] if torchrun else [])
    proc = subprocess.run(cmd + ['train.py'] + args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f'train.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}')
    return proc

def only_run_dir(outdir):
    dirs = [d for d in glob.glob(os.path.join(outdir, '*')) if os.path.isdir(d)]
    assert len(dirs) == 1
    return dirs[0]

def final_losses(run_dir):
    with open(os.path.join(run_dir, 'stats.jsonl')) as f:
        return [json.loads(line)['Loss/loss']['mean'] for line in f]

def all_tensors(state):
    """Every tensor of a training state (network, EMA, optimizer) by name."""
    out = {f'net.{k}': v for k, v in state['net'].items()} | {f'ema.{k}': v for k, v in state['ema'].items()}
    for index, moments in state['optimizer_state']['state'].items():
        out |= {f'optimizer.{index}.{k}': v for k, v in moments.items()}
    return out

def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key

#----------------------------------------------------------------------------
# generate.py runs (tests/test_generate.py, tests/test_generate_fewstep.py).

# Runs whose PNGs are compared with images made here, on the CPU, pin the CPU: on a CUDA machine
# generate.py would draw the latents with CUDA generators (as EDM does), which give other numbers.
CPU = ['--device=cpu']

def start_generate(args):
    return subprocess.Popen([sys.executable, 'generate.py', *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)

def finish_generate(proc):
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err

def pngs(outdir):
    """{relative path: pixels} of every PNG under outdir; also fails on leftover temporary files."""
    found = {}
    for dirpath, _, files in os.walk(outdir):
        for name in files:
            if name in ('dataset.json', 'sampling.json'): # class labels (checked in test_guidance.py), how the images were made
                continue
            assert name.endswith('.png'), f'unexpected file {name} in {dirpath}'
            path = os.path.join(dirpath, name)
            found[os.path.relpath(path, outdir)] = np.array(PIL.Image.open(path))
    return found

#----------------------------------------------------------------------------
# Networks and samplers.

class GaussianDenoiser:
    """Ideal denoiser of data ~ N(0, sigma_data^2 I): the probability flow ODE has the closed form
    x(sigma) = x(sigma_max) * sqrt(sigma_data^2 + sigma^2) / sqrt(sigma_data^2 + sigma_max^2)."""
    sigma_min, sigma_max, sigma_data = 0, float('inf'), 0.5
    round_sigma = staticmethod(torch.as_tensor)
    def __call__(self, x, sigma, class_labels=None):
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        return x * self.sigma_data ** 2 / (self.sigma_data ** 2 + sigma ** 2)

@functools.lru_cache(maxsize=None)
def golden_network(path): # 'networks/ddpmpp_edm_cond.npz'
    return load_golden_network(path, path[:-len('.npz')] + '.json')

def with_output_pool(disc):
    """A small-extractor discriminator as built before the fix of the DDP crash: with the encoder's
    unused output pool, registered after all its other layers."""
    ch = disc.classifier.feature_channels
    disc.classifier.out = torch.nn.Sequential(guidance.GroupNorm32(ch), torch.nn.SiLU(),
                                              guidance.AttentionPool2d(disc.img_resolution, ch, 32, 1))
    return disc

def tiny_net(seed=0):
    # Random weights everywhere (EDM starts its output layers at zero, which makes every sample alike).
    torch.manual_seed(seed)
    net = networks.EDMPrecond(img_resolution=8, img_channels=1, label_dim=4, model_type='SongUNet',
        model_channels=16, channel_mult=[1], num_blocks=1, attn_resolutions=[]).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p) / max(p[0].numel(), 1) ** 0.5)
    return net

# diff-sampler's golden outputs of the few-step solvers (tests/golden/solvers).
SOLVERS_GOLDEN = os.path.join(ROOT, 'tests', 'golden', 'solvers')
SOLVERS_README = json.load(open(os.path.join(SOLVERS_GOLDEN, 'README.json')))
SOLVERS_DATA = np.load(os.path.join(SOLVERS_GOLDEN, 'solvers.npz'), allow_pickle=False)

#----------------------------------------------------------------------------

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
