"""Every GPU promise in one command, for the rare visits to a GPU: a complete verdict in minutes.

    python bench/gpu_check.py                    # on one GPU, at most 8.75 minutes: report + its section of docs/benchmarks.md
    python bench/gpu_check.py --only=2,4         # a second visit: re-run what failed (report only)
    python bench/gpu_check.py --smoke            # every check's code path at tiny sizes on a CPU (run by the tests)

The checks, in the order they run (the numbers are those of issue 17 and of --only):

    1  the tests that need CUDA, and the exact-resume test (--deterministic on CUDA)
    5  the semi-discrete OT fit at 20,000 targets of 3x32x32: seconds per Adam step, peak memory
    6  building one AOT pool on the GPU while training runs, against an idle GPU, at 1, 10, 1000 classes
    3  torchrun with 1 process and with 2 processes sharing the GPU (--arch=ncsnpp), ranks' weights equal
    4  generate.py on CUDA (same PNGs at two batch sizes, --dg, --ot-map), fid.py calc with the stand-in
    7  AOT at scale: solver knn at 16,384 against the exact solvers
    8  few-step sampling on CUDA (issue 18): generate.py --solver=ipndm at two batch sizes,
       tools/schedule_search.py and --sigmas, bench/fewstep_speed.py on a CIFAR-10-sized DDPM++
    2  training throughput of every mode at EDM's CIFAR-10 per-GPU setting, with the goal lines

Each check runs its programs as subprocesses under its own time budget, so a crash or a hang fails
that check and the others still run. The markdown report is rewritten after every check, so an
interrupted run still leaves one. Data: the bundled digits, upscaled to 32x32 RGB (nothing is
downloaded). Exit status 0 only if every check that ran passed.
"""

import contextlib
import importlib.util
import io
import json
import math
import os
import pickle
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree
import zipfile

import click
import numpy as np
import PIL.Image
import torch

from bench import report
from dnnlib.util import atomic_write
from training import networks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#----------------------------------------------------------------------------
# What runs: the tests, the training configurations and the sizes, in one place.

# Check 1. Tests that skip without CUDA, and the exact-resume pair (its fixture adds --deterministic
# on CUDA). A skip on a GPU machine is a failure. --smoke runs only those that skip at once on a CPU.
CUDA_TESTS = [
    'tests/test_augment.py::test_device_matches_golden',
    'tests/test_generate.py::test_cuda_images_match_the_sampler_on_cuda',
    'tests/test_train.py::test_resume_equals_uninterrupted',
    'tests/test_train.py::test_resume_continues',
    'tests/test_train.py::test_sigint_then_resume_by_folder_equals_uninterrupted',
    'tests/test_train.py::test_foreach_updates_match_edm_bit_for_bit',
    'tests/test_pools.py::test_cuda_pools_are_handed_over_to_the_training_stream',
    'tests/test_pools.py::test_cuda_pool_has_the_cpu_pools_augmentation',
    'tests/test_augment.py::test_cuda_chunks_bound_memory',
]
SMOKE_TESTS = CUDA_TESTS[:2]

# Check 2. name: train.py options added to SIZES[...]['speed'], in the order they run (what the goals
# need first, should the budget run out); 'default' is the baseline of the ratios.
SPEED_CONFIGS = {
    'default':  [],                                  # --workers auto, EDM's exact fp32
    'aot0':     ['--aot=0'],                         # plain EDM noise, same loop
    'tf32':     ['--tf32'],
    'bf16':     ['--bf16'],
    'fp16':     ['--fp16=1'],
    'fast':     None,                                # the fastest of tf32/bf16/fp16, plus --tf32 --compile
    'workers':  ['--workers={workers}', '--seed=1'], # pools in worker processes; another seed: its loss curve is the seed spread
    'workers0': ['--workers=0'],                     # pools built in the training process, on the GPU
    'lap':      ['--aot-solver=lap'],                # the optional solver, when its package is installed
}
OPTIONAL = {'lap': 'lap'} # config: the package it needs
NUMERIC_MODES = ['tf32', 'bf16', 'fp16']
SEED_SPREAD = 'workers'

# Per mode: time budgets (s) of the checks, and sizes. Time a check leaves unused goes to the next
# ones; the GPU budgets add up to 8.75 minutes.
SIZES = {
    'gpu': dict(
        budgets={1: 80, 5: 25, 6: 55, 3: 50, 4: 60, 7: 50, 8: 75, 2: 130},
        res=32, workers=4,
        speed='--arch=ddpmpp --batch=64 --augment=0.12 --aot=512 --cond=0', first=0.064, tick=1.024, ticks=4, speed_only=None,
        ddp='--arch=ncsnpp --batch=32 --aot=32 --cond=0', ddp_kimg=0.128, ddp_procs=(1, 2),
        net='--arch=ddpmpp --cbase=32 --cres=1,2 --batch=64 --aot=64 --cond=0', net_kimg=0.256,
        seeds=64, batches=(64, 23), dg='--batch=32 --kimg=0.256 --snap=0.128', ot_targets=64, fid='',
        ot_fit=dict(targets=20000, res=32, steps=3),
        pools=dict(pool=512, batch=64, rounds=3, net=dict(model_channels=128, channel_mult=[2, 2, 2])),
        scale=dict(large='2048,16384', exact=2048, reference_k=64, goal_pool=16384, goal_sec=2.0),
        fewstep=dict(net=dict(img_resolution=32, model_channels=128, channel_mult=[2, 2, 2]), seeds=64, batches=(64, 23),
                     search='--steps=11', speed='--batch=64 --steps=11 --rounds=2 --search-rounds=1 --search-seeds=0-127')),
    'smoke': dict(
        budgets={1: 120, 5: 120, 6: 120, 3: 240, 4: 300, 7: 200, 8: 200, 2: 400},
        res=8, workers=1,
        # Start-up is most of a tiny run's cost: fewer runs and processes (no DataLoader workers).
        speed='--arch=ddpmpp --cbase=16 --cres=1 --batch=16 --augment=0.12 --aot=16 --cond=0 --workers=0', first=0.016, tick=0.032, ticks=4,
        speed_only=['default', 'aot0', 'bf16', 'fast'],
        ddp='--arch=ncsnpp --cbase=16 --cres=1 --batch=16 --aot=16 --cond=0 --workers=0', ddp_kimg=0.032, ddp_procs=(2,),
        net='--arch=ddpmpp --cbase=16 --cres=1 --batch=16 --aot=16 --cond=0 --workers=0', net_kimg=0.032,
        seeds=12, batches=(12, 5), dg='--batch=8 --kimg=0.016 --snap=0.016', ot_targets=6, fid='--workers=0',
        ot_fit=dict(targets=200, res=8, steps=2),
        pools=dict(pool=32, batch=16, rounds=2, net=dict(model_channels=16, channel_mult=[1])),
        scale=dict(large='64,128', exact=64, reference_k=16, goal_pool=128, goal_sec=2.0),
        fewstep=dict(net=dict(img_resolution=8, model_channels=16, channel_mult=[1]), seeds=12, batches=(12, 5),
                     search='--steps=5 --seeds=0-7 --teacher-steps=9',
                     speed='--batch=4 --steps=5 --rounds=1 --search-rounds=1 --search-seeds=0-4 --search-steps=5 --teacher-steps=7')),
}
WARMUP_TICKS = 2 # tick 0 is one step (start-up, compilation); tick 1 still warms up
POOL_CLASSES = [1, 10, 1000]
DIGITS = os.path.join(ROOT, 'datasets', 'uci-digits-16x16.zip')
PY = sys.executable

#----------------------------------------------------------------------------
# Running programs under a check's budget.

class CheckFailed(Exception):
    pass

def failure(err):
    """A failure's first line, and the rest (a program's last output lines) as a markdown code block."""
    first, *rest = str(err).split('\n', 1)
    return first, (['```', rest[0], '```'] if rest else [])

def tail(text, lines=15):
    return '\n'.join(text.rstrip().splitlines()[-lines:])

class Context:
    """What the checks share: the mode, the work folder, the current check's deadline, the data."""

    def __init__(self, smoke, workdir, start):
        self.smoke, self.workdir, self.start = smoke, workdir, start
        self.size = SIZES['smoke' if smoke else 'gpu']
        self.cuda = torch.cuda.is_available()
        self.deadline = math.inf
        self._digits = None

    def say(self, text):
        print(f'[{time.time() - self.start:5.0f}s] {text}', flush=True)

    def path(self, *parts):
        return os.path.join(self.workdir, *parts)

    def sh(self, cmd, what, env=None):
        """Run cmd in the repository root within the check's budget; its output, or CheckFailed."""
        left = self.deadline - time.time()
        if left <= 1:
            raise CheckFailed(f'{what}: no time left in the check\'s budget')
        self.say(f'  {what}')
        log = self.path('logs', f'{len(os.listdir(self.path("logs"))):03d}.log')
        with open(log, 'w') as f:
            f.write(shlex.join(cmd) + '\n')
            f.flush()
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                rc = proc.wait(timeout=left)
            except subprocess.TimeoutExpired:
                rc = None
            finally: # also on Ctrl-C: torchrun's and pytest's children go with it
                if proc.poll() is None and hasattr(os, 'killpg'):
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
        out = open(log).read()
        if rc is None:
            raise CheckFailed(f'{what}: stopped at the check\'s budget ({left:.0f}s left when it started)\n{tail(out)}')
        if rc != 0:
            raise CheckFailed(f'{what}: exit status {rc}\n{tail(out)}')
        return out

    def digits(self):
        """The bundled digits as res x res RGB PNGs with their labels, made once."""
        if self._digits is None:
            self._digits = make_digits(self.path('digits'), self.size['res'])
        return self._digits

def make_digits(dest, res):
    os.makedirs(dest)
    with zipfile.ZipFile(DIGITS) as z:
        labels = json.loads(z.read('dataset.json'))['labels']
        for name, _ in labels:
            img = PIL.Image.open(io.BytesIO(z.read(name))).convert('RGB').resize((res, res), PIL.Image.LANCZOS)
            img.save(os.path.join(dest, os.path.basename(name)))
    with open(os.path.join(dest, 'dataset.json'), 'w') as f:
        json.dump({'labels': [[os.path.basename(name), label] for name, label in labels]}, f)
    return dest

def train_cmd(ctx, run_dir, kimg, args, tick=None, torchrun=0):
    """train.py for kimg from a fixed seed, saving no snapshots, states or grids (add --snap=1 for a final snapshot)."""
    launcher = [PY, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={torchrun}'] if torchrun else [PY]
    return [*launcher, 'train.py', f'--outdir={run_dir}', '--nosubdir', f'--data={ctx.digits()}', f'--duration={kimg / 1000:.9f}',
            f'--tick={tick or kimg}', '--snap=100000', '--dump=100000', '--grid=0', '--seed=0', *args]

#----------------------------------------------------------------------------
# Check 1: tests.

def check_tests(ctx):
    xml_path = ctx.path('pytest.xml')
    tests = SMOKE_TESTS if ctx.smoke else CUDA_TESTS
    ctx.sh([PY, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', f'--junitxml={xml_path}', *tests], 'pytest ' + ' '.join(tests))
    suite = xml.etree.ElementTree.parse(xml_path).getroot()
    suite = suite if suite.tag == 'testsuite' else suite.find('testsuite')
    n, skipped = int(suite.get('tests')), int(suite.get('skipped'))
    summary = f'{n - skipped} passed, {skipped} skipped'
    if not ctx.cuda: # smoke on a CPU: the CUDA tests skip, as they should there
        return True, summary + ' (no CUDA here)', []
    return skipped == 0 and n > 0, summary, [] if skipped == 0 else ['A test skipped on a CUDA machine: it did not run.']

#----------------------------------------------------------------------------
# Check 2: training throughput.

def read_run(run_dir, skip=WARMUP_TICKS):
    """Steady-state figures of a train.py run from its stats.jsonl (ticks after the first `skip`), and its loss per tick."""
    with open(os.path.join(run_dir, 'stats.jsonl')) as f:
        ticks = [json.loads(line) for line in f]
    if len(ticks) <= skip:
        raise CheckFailed(f'{run_dir}: {len(ticks)} ticks, need more than {skip}')
    mean = lambda t, key: t[key]['mean'] if key in t else float('nan')
    steady = ticks[skip:]
    secs = np.array([mean(t, 'Timing/sec_per_tick') for t in steady])
    waits = np.array([mean(t, 'Timing/aot_wait_frac') for t in steady])
    kimg = mean(ticks[-1], 'Progress/kimg') - mean(ticks[skip - 1], 'Progress/kimg')
    return dict(sec_per_kimg=float(secs.sum() / kimg), aot_wait=float((waits * secs).sum() / secs.sum()),
                peak_gb=max(mean(t, 'Resources/peak_gpu_mem_gb') for t in ticks), losses=[mean(t, 'Loss/loss') for t in ticks])

def fast_flags(runs):
    """The fastest numeric mode that ran, with TF32 for what stays in fp32, compiled."""
    timed = [name for name in NUMERIC_MODES if name in runs]
    if not timed:
        raise CheckFailed('no numeric mode ran: nothing to combine with --compile')
    best = min(timed, key=lambda name: runs[name]['sec_per_kimg'])
    return sorted(set(SPEED_CONFIGS[best]) | {'--tf32'}) + ['--compile']

def speed(run, base):
    return base['sec_per_kimg'] / run['sec_per_kimg']

def curve(run, base):
    """Mean distance between two loss curves (loss per tick)."""
    return float(np.mean(np.abs(np.subtract(run['losses'], base['losses']))))

def speed_goals(runs):
    """[(goal line, met)] from the runs' figures (read_run); a goal whose runs are missing is not met."""
    def goal(label, needs, text, met):
        lost = [name for name in needs if name not in runs]
        if lost:
            return f'{label}: not measured (no {", ".join(lost)} run)', False
        return f'{label}: {text()}', bool(met())
    d, a, f, s = (runs.get(name) for name in ['default', 'aot0', 'fast', SEED_SPREAD])
    return [
        goal('default aot_wait', ['default'], lambda: f'{d["aot_wait"]:.2%} (goal <= 1%)', lambda: d['aot_wait'] <= 0.01),
        goal('default sec/kimg', ['default', 'aot0'], lambda: f'{d["sec_per_kimg"]:.3f} (goal <= --aot 0\'s {a["sec_per_kimg"]:.3f} x 1.02)',
             lambda: d['sec_per_kimg'] <= a['sec_per_kimg'] * 1.02),
        goal('fast throughput', ['default', 'fast'], lambda: f'{speed(f, d):.2f}x the default (goal >= 2x)', lambda: speed(f, d) >= 2),
        goal('fast loss curve', ['default', 'fast', SEED_SPREAD], lambda: f'mean |fast - default| per tick {curve(f, d):.4f} '
             f'(goal <= the seed spread: mean |seed 1 - seed 0| {curve(s, d):.4f})', lambda: curve(f, d) <= curve(s, d)),
    ]

def check_speed(ctx):
    s = ctx.size
    names = s['speed_only'] or list(SPEED_CONFIGS)
    kimg = s['first'] + s['tick'] * s['ticks']
    runs, flags, notes = {}, {}, []
    missing = [name for name in names if name in OPTIONAL and importlib.util.find_spec(OPTIONAL[name]) is None]
    notes += [f'- {name}: skipped, the optional {OPTIONAL[name]} package is not installed (pip install {OPTIONAL[name]})' for name in missing]
    names = [name for name in names if name not in missing]
    for name in names:
        flags[name] = fast_flags(runs) if name == 'fast' else [f.format(**s) for f in SPEED_CONFIGS[name]]
        if name == 'fast' and not ctx.cuda:
            flags[name].remove('--compile')
            notes.append('- fast ran without --compile: no CUDA here (torch.compile is timed on the GPU only).')
        run_dir = ctx.path('speed', name)
        try:
            ctx.sh(train_cmd(ctx, run_dir, kimg, s['speed'].split() + flags[name], tick=s['tick']), f'train.py {name}: {" ".join(flags[name]) or "(defaults)"}')
            runs[name] = read_run(run_dir)
        except CheckFailed as err:
            first, output = failure(err)
            notes += [f'- {name} failed: {first}', *output]
            continue
        ctx.say(f'    {runs[name]["sec_per_kimg"]:.3f} sec/kimg, aot_wait {runs[name]["aot_wait"]:.1%}')
    goals = speed_goals(runs)
    lines = [f'`train.py {s["speed"]}` on the digits at {s["res"]}x{s["res"]} RGB, {kimg:g} kimg per run; steady state = '
             f'ticks of {s["tick"]:g} kimg after the first {WARMUP_TICKS} (start-up and compilation excluded).', '',
             '| config | options | sec/kimg | aot_wait | peak GPU mem (GB) | speed vs default | mean loss |', '|---|---|---:|---:|---:|---:|---:|']
    for name, run in runs.items():
        ratio = f'{speed(run, runs["default"]):.2f}x' if 'default' in runs else '-'
        lines.append(f'| {name} | {" ".join(flags[name]) or "-"} | {run["sec_per_kimg"]:.3f} | {run["aot_wait"]:.2%} | '
                     f'{run["peak_gb"]:.2f} | {ratio} | {np.mean(run["losses"]):.4f} |')
    lines += [''] + [f'- {"met" if met else "MISSED"}: {line}' for line, met in goals] + [''] + notes
    summary = ', '.join(f'{name} {run["sec_per_kimg"]:.2f}' for name, run in runs.items()) + ' sec/kimg'
    ok = len(runs) == len(names) and (ctx.smoke or all(met for _, met in goals)) # smoke: a CPU's speed proves nothing
    return ok, summary, lines

#----------------------------------------------------------------------------
# Check 3: torchrun, one process and two sharing the GPU.

def check_ddp(ctx):
    s, lines, figures = ctx.size, [], []
    # One visible GPU, also on a machine with more: the ranks must share it.
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=os.environ.get('CUDA_VISIBLE_DEVICES', '0').split(',')[0]) if ctx.cuda else None
    for nproc in s['ddp_procs']:
        out = ctx.sh(train_cmd(ctx, ctx.path(f'ddp{nproc}'), s['ddp_kimg'], s['ddp'].split(), torchrun=nproc),
                     f'torchrun --nproc_per_node={nproc} train.py {s["ddp"]}', env=env)
        fallbacks = [line.strip() for line in out.splitlines() if 'Warning (rank' in line] # torchrun may prefix the ranks' lines
        if nproc > 1 and f'weights identical on all {nproc} ranks' not in out:
            raise CheckFailed(f'{nproc} processes: no rank check in the output\n{tail(out)}')
        if ctx.cuda and len(fallbacks) != (nproc if nproc > 1 else 0):
            raise CheckFailed(f'{nproc} process(es) on one GPU: {len(fallbacks)} ranks said they fall back to gloo\n{tail(out)}')
        figures.append(f'{nproc} process{"es" if nproc > 1 else ""}: ' + ('weights identical' if nproc > 1 else 'ran')
                       + (f', {len(fallbacks)} ranks fell back' if fallbacks else ''))
        lines += [f'- {nproc} process(es): ' + ('weights identical on all ranks' if nproc > 1 else 'trained')] + [f'  - `{line}`' for line in fallbacks]
    return True, '; '.join(figures), lines

#----------------------------------------------------------------------------
# Check 4: generate.py and fid.py.

def read_pngs(folder):
    names = sorted(n for n in os.listdir(folder) if n.endswith('.png'))
    return {n: np.asarray(PIL.Image.open(os.path.join(folder, n))) for n in names}

def same_at_two_batches(ctx, sample, seeds, batches, name):
    """Run generate.py (the arguments in sample) for seeds 0 .. seeds-1 at two batch sizes; how many PNGs are identical, or CheckFailed."""
    for batch in batches:
        ctx.sh([PY, *sample, f'--outdir={ctx.path(f"{name}{batch}")}', f'--seeds=0-{seeds - 1}', f'--batch={batch}'], f'generate.py {shlex.join(sample[2:])} --batch={batch}')
    a, b = (read_pngs(ctx.path(f'{name}{batch}')) for batch in batches)
    same = sum(np.array_equal(a[n], b[n]) for n in a if n in b)
    if not (len(a) == len(b) == seeds == same):
        raise CheckFailed(f'generate.py {shlex.join(sample[2:])} at batch {batches[0]} and {batches[1]}: {same} of {seeds} images identical ({len(a)} and {len(b)} written)')
    return same

def check_generate(ctx):
    s = ctx.size
    ctx.sh(train_cmd(ctx, ctx.path('net'), s['net_kimg'], s['net'].split() + ['--snap=1']), f'train.py {s["net"]} (a network to sample)')
    net = ctx.path('net', sorted(n for n in os.listdir(ctx.path('net')) if n.startswith('network-snapshot-') and n.endswith('.pkl'))[-1])
    sample = ['generate.py', f'--network={net}', '--rho=90', '--steps=14']
    same = same_at_two_batches(ctx, sample, s['seeds'], s['batches'], 'gen')
    fakes = ctx.path(f'gen{s["batches"][0]}')
    ctx.sh([PY, 'train_discriminator.py', f'--data={ctx.digits()}', f'--fakes={fakes}', f'--outdir={ctx.path("disc")}', *s['dg'].split()], 'train_discriminator.py')
    ctx.sh([PY, *sample, f'--outdir={ctx.path("gen-dg")}', '--seeds=0-7', f'--dg={ctx.path("disc", "discriminator.safetensors")}'], 'generate.py --dg')
    ctx.sh([PY, 'tools/ot_map.py', f'--network={net}', '--source=ode', '--sigma-T=5', f'--targets={s["ot_targets"]}', '--target-steps=4',
            '--fit-steps=20', f'--out={ctx.path("map.safetensors")}'], 'tools/ot_map.py')
    ctx.sh([PY, 'generate.py', f'--network={net}', f'--outdir={ctx.path("gen-ot")}', '--seeds=0-7', '--steps=6',
            f'--ot-map={ctx.path("map.safetensors")}'], 'generate.py --ot-map')
    written = {name: len(read_pngs(ctx.path(name))) for name in ['gen-dg', 'gen-ot']}
    if written != {'gen-dg': 8, 'gen-ot': 8}:
        raise CheckFailed(f'images written: {written}, expected 8 each')
    ref = ctx.path('ref.npz')
    ctx.sh([PY, 'fid.py', 'ref', f'--data={ctx.digits()}', f'--dest={ref}', '--detector=standin', *s['fid'].split()], 'fid.py ref --detector=standin')
    out = ctx.sh([PY, 'fid.py', 'calc', f'--images={fakes}', f'--ref={ref}', f'--num={s["seeds"]}', '--detector=standin', *s['fid'].split()], 'fid.py calc --detector=standin')
    fid_line = next((line.strip() for line in out.splitlines() if 'FID' in line), 'no FID line')
    summary = f'{same}/{s["seeds"]} PNGs identical at batch {s["batches"][0]} and {s["batches"][1]}; --dg, --ot-map ran; stand-in FID ran'
    return True, summary, [f'- {summary}', f'- fid.py calc: `{fid_line}`']

#----------------------------------------------------------------------------
# Checks 5 and 6 measure inside a process of their own (run with `python -c`): a crash stays there.

def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)

def peak_gb(device):
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == 'cuda' else float('nan')

def measure_ot_fit(out, targets, res, steps):
    from sampling import ot_start
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    images = torch.rand([targets, 3, res, res], generator=torch.Generator().manual_seed(0)) * 2 - 1
    y = ot_start.data_targets(images, sigma_T=10).to(device)
    ot_start.fit_potentials(y, steps=1, samples_per_step=1000, eval_samples=1000) # kernels and allocator warm
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    _, fit = ot_start.fit_potentials(y, steps=steps, eval_samples=20 * targets) # eval: one more step's worth of latents
    sync(device)
    sec = (time.perf_counter() - start) / (steps + 1)
    with open(out, 'w') as f:
        json.dump(dict(sec_per_step=sec, peak_gb=peak_gb(device), max_relative_deviation=fit['max_relative_deviation']), f)

def check_ot_fit(ctx):
    p = ctx.size['ot_fit']
    out = ctx.path('ot_fit.json')
    ctx.sh([PY, '-c', f'from bench import gpu_check; gpu_check.measure_ot_fit({out!r}, {p["targets"]}, {p["res"]}, {p["steps"]})'],
           f'semidiscrete_ot.fit_potentials: {p["targets"]} targets of 3x{p["res"]}x{p["res"]}, {p["steps"]} Adam steps')
    r = json.load(open(out))
    summary = (f'{r["sec_per_step"]:.2f} s per Adam step (20 latents per target), peak GPU memory {r["peak_gb"]:.2f} GB, '
               f'{p["targets"]} targets')
    return True, summary, [f'- {summary}; the 300 steps of a default fit (tools/ot_map.py) would take {300 * r["sec_per_step"] / 60:.1f} min. '
                           f'After {p["steps"]} steps the largest cell mass is off by {r["max_relative_deviation"]:.2f} x 1/M.']

class Relabelled(torch.utils.data.Dataset):
    """The images of `dataset` with one-hot label i % classes: the same pools at any class count."""
    def __init__(self, dataset, classes):
        self.dataset, self.classes = dataset, classes
    def __len__(self):
        return len(self.dataset)
    def __getitem__(self, i):
        label = np.zeros(self.classes, dtype=np.float32)
        label[i % self.classes] = 1
        return self.dataset[i][0], label

def measure_pools(out, data, res, pool, batch, rounds, net_kwargs):
    from training import augment, networks
    from training.dataset import ImageFolderDataset
    from training.pools import PoolStream
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    # EDM's CIFAR-10 DDPM++ (train.py --arch=ddpmpp) and its Adam, stepping on random batches.
    net = networks.EDMPrecond(img_resolution=res, img_channels=3, label_dim=0, model_type='SongUNet', embedding_type='positional',
        encoder_type='standard', decoder_type='standard', channel_mult_noise=1, resample_filter=[1, 1], **net_kwargs).to(device).train()
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    x = torch.randn([batch, 3, res, res], device=device)
    def step():
        sigma = torch.rand([batch, 1, 1, 1], device=device) * 10
        (net(x + sigma * torch.randn_like(x), sigma) - x).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    def timed(fn):
        start = time.perf_counter()
        fn()
        sync(device)
        return time.perf_counter() - start
    step()
    step_sec = float(np.median([timed(step) for _ in range(rounds)]))
    pipe = augment.AugmentPipe(p=0.12, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1) # train.py's
    dataset = ImageFolderDataset(path=data, use_labels=False, cache=True)
    for i in range(len(dataset)): # decoded once, into the cache: builds are timed, not PNG reading
        dataset[i]
    rows = []
    for classes in POOL_CLASSES:
        stream = PoolStream(Relabelled(dataset, classes), pool, augment_pipe=pipe, device=device)
        stream.make_pool(0)
        idle = float(np.median([timed(lambda k=k: stream.make_pool(k)) for k in range(1, rounds + 1)]))
        stop, started, errors = threading.Event(), threading.Event(), []
        def load():
            try:
                while not stop.is_set():
                    step()
                    started.set()
            except Exception as err:
                errors.append(err)
            started.set()
        thread = threading.Thread(target=load)
        thread.start()
        try:
            started.wait()
            loaded = float(np.median([timed(lambda k=k: stream.make_pool(k)) for k in range(1, rounds + 1)]))
        finally:
            stop.set()
            thread.join()
        if errors:
            raise errors[0]
        rows.append(dict(classes=classes, idle=idle, loaded=loaded))
    with open(out, 'w') as f:
        json.dump(dict(step_sec=step_sec, feeds_sec=step_sec * pool / batch, rows=rows), f)

def check_pools(ctx):
    p = ctx.size['pools']
    out = ctx.path('pools.json')
    ctx.sh([PY, '-c', f'from bench import gpu_check; gpu_check.measure_pools({out!r}, {ctx.digits()!r}, {ctx.size["res"]}, '
            f'{p["pool"]}, {p["batch"]}, {p["rounds"]}, {p["net"]!r})'], f'pools of {p["pool"]} at {POOL_CLASSES} classes, idle and under training load')
    r = json.load(open(out))
    goals = [(f'{row["classes"]} classes: pool built in {row["loaded"]:.3f} s under load (goal <= the {r["feeds_sec"]:.3f} s of training it feeds)',
              row['loaded'] <= r['feeds_sec']) for row in r['rows']]
    lines = [f'One pool of {p["pool"]} (augmented, paired per class) built on the training device, median of {p["rounds"]}; '
             f'load: training steps of DDPM++ at batch {p["batch"]} ({r["step_sec"]:.3f} s each; one pool feeds {p["pool"] // p["batch"]} steps).', '',
             '| classes | idle (s) | under load (s) | load / idle |', '|---:|---:|---:|---:|']
    lines += [f'| {row["classes"]} | {row["idle"]:.3f} | {row["loaded"]:.3f} | {row["loaded"] / row["idle"]:.2f} |' for row in r['rows']]
    lines += [''] + [f'- {"met" if met else "MISSED"}: {line}' for line, met in goals]
    summary = ', '.join(f'{row["classes"]} cl. {row["idle"]:.2f}/{row["loaded"]:.2f} s' for row in r['rows']) + ' (idle/under load)'
    return ctx.smoke or all(met for _, met in goals), summary, lines

#----------------------------------------------------------------------------
# Check 7: AOT at scale (issue 19).

def table_rows(out, first):
    return [line for line in out.splitlines() if line.startswith(first)]

def check_aot_scale(ctx):
    p = ctx.size['scale']
    device = 'cuda' if ctx.cuda else 'cpu'
    out = ctx.sh([PY, 'bench/aot_cost.py', '--pools=', '--no-builds', '--no-train', '--no-doc', f'--large-pools={p["large"]}', '--large-ks=32',
                  f'--exact-max={p["exact"]}', f'--reference-k={p["reference_k"]}', f'--device={device}'], f'solver knn at pools {p["large"]} on {device}')
    rows = table_rows(out, '| ')
    knn = [r for r in rows if r.split('|')[2].strip() == 'knn k=32']
    cells = {int(r.split('|')[1].replace(',', '')): r.split('|') for r in knn}
    if p['goal_pool'] not in cells or p['exact'] not in cells:
        raise CheckFailed(f'no knn rows for pools {p["exact"]} and {p["goal_pool"]} in the bench output\n{tail(out)}')
    seconds = float(cells[p['goal_pool']][3])
    kept = float(cells[p['exact']][7])
    goals = [(f'knn pairs {p["goal_pool"]} in {seconds:.2f} s (goal about a second: <= {p["goal_sec"]} s)', seconds <= p['goal_sec']),
             (f'knn keeps {kept:.4f} of the exact pairing\'s gain at {p["exact"]} (goal: cost within 1%, i.e. gain kept >= 0.99 here)', kept >= 0.99)]
    lines = [f'Solver `knn` on the {device} (`bench/aot_cost.py`, random 3x32x32; exact solvers up to '
             f'{p["exact"]}, above it knn at k = {p["reference_k"]} is the reference):', '', rows[0], table_rows(out, '|---')[0], *rows[1:],
             ''] + [f'- {"met" if met else "MISSED"}: {line}' for line, met in goals]
    summary = f'knn {p["goal_pool"]}: {seconds:.2f} s, gain kept {kept:.4f} at {p["exact"]}'
    return ctx.smoke or all(met for _, met in goals), summary, lines

#----------------------------------------------------------------------------
# Check 8: few-step sampling on CUDA.

def save_ddpmpp(path, img_resolution, **kwargs):
    """A conditional DDPM++ EDMPrecond with random weights (train.py's --arch=ddpmpp), as a snapshot pickle."""
    torch.manual_seed(0)
    net = networks.EDMPrecond(img_resolution=img_resolution, img_channels=3, label_dim=10, model_type='SongUNet', embedding_type='positional',
                              encoder_type='standard', decoder_type='standard', channel_mult_noise=1, resample_filter=[1, 1], **kwargs)
    with open(path, 'wb') as f:
        pickle.dump(dict(ema=net.eval().requires_grad_(False)), f)

def check_few_step(ctx):
    p = ctx.size['fewstep']
    net = ctx.path('ddpmpp.pkl')
    save_ddpmpp(net, **p['net'])
    same = same_at_two_batches(ctx, ['generate.py', f'--network={net}', '--solver=ipndm', '--steps=11'], p['seeds'], p['batches'], 'fs')
    levels = ctx.path('levels.json')
    search = ctx.sh([PY, 'tools/schedule_search.py', f'--network={net}', *p['search'].split(), f'--out={levels}'], 'tools/schedule_search.py')
    ctx.sh([PY, 'generate.py', f'--network={net}', '--solver=ipndm', f'--sigmas={levels}', '--seeds=0-7', f'--outdir={ctx.path("fs-searched")}'],
           'generate.py --sigmas=the searched levels')
    written = len(read_pngs(ctx.path('fs-searched')))
    if written != 8:
        raise CheckFailed(f'generate.py --sigmas wrote {written} images, expected 8')
    out = ctx.sh([PY, 'bench/fewstep_speed.py', f'--network={net}', *p['speed'].split(), '--no-doc'], 'bench/fewstep_speed.py')
    verdict = [line for line in out.splitlines() if line.startswith('Lowest ') or line.startswith('Search at ')]
    loop = [line for line in verdict if line.startswith('Lowest ')]
    if not loop:
        raise CheckFailed(f'no verdict line in the bench output\n{tail(out)}')
    met = ': meets the goal' in loop[0]
    rows = [line for row in table_rows(out, '|') for line in ([''] if row.startswith('| what') else []) + [row]] # two tables
    lines = [f'{same}/{p["seeds"]} PNGs identical with `--solver=ipndm --steps=11` at batch {p["batches"][0]} and {p["batches"][1]}; '
             f'`tools/schedule_search.py {p["search"]}` and `generate.py --sigmas` ran. Its report:', '', '```',
             *[line for line in search.splitlines() if ' levels for ' in line or ' error against ' in line], '```', '',
             f'`bench/fewstep_speed.py {p["speed"]}` on a conditional DDPM++ of {p["net"]["img_resolution"]}x{p["net"]["img_resolution"]}x3 '
             f'(random weights; on CUDA the verdict is the direct ratio, wall time with the writes in their thread):', '', *rows, '', *verdict]
    summary = f'{same}/{p["seeds"]} ipndm PNGs identical; search ran; ' + loop[0].split(': ', 1)[1]
    return ctx.smoke or met, summary, lines

#----------------------------------------------------------------------------
# The report.

CHECKS = { # number: (title, function), in the order they run
    1: ('tests that need CUDA, exact resume', check_tests),
    5: ('semi-discrete OT fit at CIFAR scale', check_ot_fit),
    6: ('pool building under training load', check_pools),
    3: ('torchrun: 1 process, 2 sharing the GPU', check_ddp),
    4: ('generate.py, --dg, --ot-map, fid.py', check_generate),
    7: ('AOT at scale: knn solver', check_aot_scale),
    8: ('few-step solvers, schedule search, speed', check_few_step),
    2: ('training throughput and goals', check_speed),
}

def machine():
    if torch.cuda.is_available():
        return f'{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}'
    return f'CPU only ({os.cpu_count()} cores), torch {torch.__version__}, CUDA {torch.version.cuda or "none"}'

def render(results, smoke, wall):
    """The report's markdown: verdict, one row per check, then each check's figures."""
    failed = [str(num) for num, r in results.items() if r['status'] != 'pass']
    verdict = 'PASS' if not failed else f'FAIL (check{"s" if len(failed) > 1 else ""} {", ".join(failed)})'
    lines = ['## GPU check (`bench/gpu_check.py`)', '']
    if smoke:
        lines += ['**SMOKE RUN**: tiny sizes on whatever device is here; it proves the code paths run, its figures prove nothing '
                  'and the goals are shown but not judged.', '']
    lines += [f'**Verdict: {verdict}**, {wall:.0f} s wall.', '', '| # | check | verdict | seconds | figures |', '|---:|---|---|---:|---|']
    for num, r in results.items():
        lines.append(f'| {num} | {CHECKS[num][0]} | {r["status"]} | {r["seconds"]:.0f} | {r["summary"]} |')
    for num, r in results.items():
        if r['details']:
            lines += ['', f'### {num}. {CHECKS[num][0]}: {r["status"]}', '', *r['details']]
    return '\n'.join(lines) + '\n'

def write_report(path, results, smoke, wall, stamp):
    with atomic_write(path) as tmp, open(tmp, 'w') as f:
        f.write(render(results, smoke, wall) + f'\n{machine()}, {stamp}.\n\n```\n{report.command()}\n```\n')

def run_check(ctx, num, deadline):
    """(status, summary, details) of one check, its programs stopped at the deadline."""
    fn = CHECKS[num][1]
    ctx.deadline = deadline
    try:
        ok, summary, details = fn(ctx)
        return ('pass' if ok else 'fail'), summary, details
    except CheckFailed as err:
        return ('fail', *failure(err))
    except Exception as err: # a bug in the check itself fails that check, not the run
        return 'fail', f'{type(err).__name__}: {err}', []

def interrupt(signum, frame):
    raise KeyboardInterrupt

def parse_only(text):
    try:
        nums = [int(x) for x in text.split(',') if x.strip()]
    except ValueError:
        nums = None
    if not nums or any(n not in CHECKS for n in nums):
        raise click.BadParameter(f'{text!r}: give check numbers from 1-{len(CHECKS)} separated by commas, e.g. --only=2,4', param_hint='--only')
    return nums

#----------------------------------------------------------------------------

@click.command()
@click.option('--only',    help='Run these checks only (report only, docs untouched), e.g. 2,4', metavar='LIST', type=str)
@click.option('--smoke',   help='Tiny sizes, any device: the code paths, not the figures (docs untouched)', is_flag=True)
@click.option('--report',  'report_path', help='Where to write the markdown report', metavar='FILE', default='gpu-check.md', show_default=True)
@click.option('--workdir', help='Keep the data, runs and logs here  [default: a temporary folder]', metavar='DIR', type=str)
def main(only, smoke, report_path, workdir):
    """Check every GPU promise in one command and write the report."""
    nums = parse_only(only) if only else list(CHECKS)
    if not os.path.isdir(os.path.dirname(os.path.abspath(report_path))):
        raise click.BadParameter(f'the folder of {report_path} does not exist; create it or choose another path', param_hint='--report')
    if workdir and os.path.isdir(workdir) and os.listdir(workdir):
        raise click.BadParameter(f'{workdir} is not empty; give a new or empty folder', param_hint='--workdir')
    if not smoke and not torch.cuda.is_available():
        raise click.ClickException('no CUDA device here: run on a GPU machine, or use --smoke to run the code paths on a CPU')
    docs = not smoke and not only
    stamp = time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())
    env = report.machine()
    print(env, flush=True)
    start = time.time()
    results = {num: dict(status='not run', seconds=0, summary='', details=[]) for num in nums}
    with (contextlib.nullcontext(workdir) if workdir else tempfile.TemporaryDirectory()) as work:
        os.makedirs(os.path.join(work, 'logs'), exist_ok=True)
        ctx = Context(smoke, work, start)
        budgets, deadline = ctx.size['budgets'], start
        try:
            for i, num in enumerate(nums):
                deadline += budgets[num]
                begin = time.time()
                ctx.say(f'check {num} ({i + 1} of {len(nums)}): {CHECKS[num][0]}, budget {budgets[num]} s, {deadline - begin:.0f} s with time saved before')
                status, summary, details = run_check(ctx, num, deadline)
                results[num] = dict(status=status, seconds=time.time() - begin, summary=summary, details=details)
                ctx.say(f'check {num}: {status.upper()} in {time.time() - begin:.0f} s: {summary}')
                write_report(report_path, results, smoke, time.time() - start, stamp)
        except KeyboardInterrupt:
            for r in results.values():
                if r['status'] == 'not run':
                    r['summary'] = 'interrupted'
            ctx.say('interrupted')
        write_report(report_path, results, smoke, time.time() - start, stamp)
    print(render(results, smoke, time.time() - start))
    print(f'Report: {report_path}')
    if docs:
        report.update_section('gpu_check', render(results, smoke, time.time() - start), f'{env}, CUDA {torch.version.cuda}')
    sys.exit(0 if all(r['status'] == 'pass' for r in results.values()) else 1)

if __name__ == '__main__':
    signal.signal(signal.SIGTERM, interrupt) # a job's time limit ends the run like Ctrl-C: the report is still written
    main()
