"""Every GPU promise in one command, for the rare visits to a GPU: a complete verdict in minutes.

    python bench/gpu_check.py --report=$OUT/gpu-check.md   # one GPU, at most 8.5 minutes: report, logs beside it
    python bench/gpu_check.py --only=2,4                   # a second visit: re-run what failed (report only)
    python bench/gpu_check.py --smoke                      # every check's code path at tiny sizes on a CPU (run by the tests)

What runs, in this order (docs/benchmarks.md has the budgets and their arithmetic):

    0  preflight: versions, lap or not, the start-up of one train.py and of CUDA
    2  training throughput at EDM's CIFAR-10 per-GPU setting: the default, --aot 0 and the fast
       configuration --tf32 --bf16 --compile, one after the other, alone on the GPU; the goal lines
    then, side by side (each check's programs in parallel, at most --jobs programs at a time):
    4  generate.py on CUDA (PNGs at two batch sizes: identical count, largest difference), --dg,
       --ot-map, fid.py with the stand-in detector
    1  the tests that need CUDA, and the exact-resume tests (--deterministic on CUDA), one pytest per group
    10 the fast run's loss curve against the seed spread (the default run again with another seed)
    3  torchrun with 1 process and with 2 processes sharing the GPU (--arch=ncsnpp), ranks' weights equal
    8  few-step sampling on CUDA: generate.py --solver=ipndm at two batch sizes, tools/schedule_search.py
       and --sigmas, bench/fewstep_speed.py on a CIFAR-10-sized DDPM++
    6  building one AOT pool on the GPU while training runs, against an idle GPU, at 1, 10, 1000 classes
    7  AOT at scale: solver knn at 16,384 against the exact solvers (lap only where installed)
    5  the semi-discrete OT fit at 20,000 targets of 3x32x32: seconds per Adam step, peak memory
    9  (only with --only=9) the other training modes: --tf32, --bf16, --fp16, --workers 0, lap

Checks 5, 6, 7 and 8 time things while the correctness checks run beside them: their figures are
upper bounds (a met goal holds; a missed one is re-run alone with --only). Every check and every
step in it runs its programs as subprocesses under the check's budget, so a crash or a hang fails
that step and the next ones still run. The markdown report is rewritten, and every log packed into
a .tar.gz beside it, after every check, so an interrupted run still leaves both. Programs are
killed with their process trees at a budget, on exit, and by a watchdog process when gpu_check
itself is killed (even with SIGKILL). Data: the bundled digits, upscaled to 32x32 RGB (nothing is
downloaded). Exit status 0 only if every check that ran passed.

GPU_CHECK_BREAK=<text>[,<text>...] (for the tests) replaces every program whose step name
contains one of the texts by one that fails: the failure paths run on a CPU.
"""

import concurrent.futures
import contextlib
import copy
import importlib
import io
import json
import math
import os
import pickle
import re
import shlex
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import xml.etree.ElementTree
import zipfile

import click
import numpy as np
import PIL.Image
import psutil
import torch

from bench import report
from dnnlib.util import atomic_write
from training import networks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#----------------------------------------------------------------------------
# What runs: the tests, the training configurations and the sizes, in one place.

# Check 1. Tests that skip without CUDA, and the exact-resume tests (their fixture adds
# --deterministic on CUDA), in groups that run as pytest processes of their own, side by side: a
# group stopped at the budget loses only its own verdicts. A skip on a GPU machine is a failure.
# --smoke runs only tests that skip at once on a CPU.
CUDA_TESTS = {
    'resume': ['tests/test_train.py::test_resume_equals_uninterrupted', 'tests/test_train.py::test_resume_continues'],
    'sigint': ['tests/test_train.py::test_sigint_then_resume_by_folder_equals_uninterrupted',
               'tests/test_train_ddp.py::test_stop_agreed_over_nccl'],
    'pools':  ['tests/test_pools.py::test_cuda_pool_has_the_cpu_pools_augmentation',
               'tests/test_nearest_of.py::test_cuda_nearest_pool_has_the_cpu_pools_noise',
               'tests/test_train.py::test_foreach_updates_match_edm_bit_for_bit'],
    'images': ['tests/test_augment.py::test_device_matches_golden', 'tests/test_augment.py::test_cuda_chunks_bound_memory',
               'tests/test_generate.py::test_cuda_images_match_the_sampler_on_cuda'],
}
SMOKE_TESTS = {'pools': CUDA_TESTS['pools'][:1], 'images': CUDA_TESTS['images'][2:]}

# Checks 2, 10 and 9. name: train.py options added to SIZES[...]['speed']; 'default' is the
# baseline of the ratios. Check 2 times the three its goals need, in this order, alone on the GPU.
FAST = ['--tf32', '--bf16', '--compile'] # the fastest measured on the H100 (1.35 s/kimg against fp32's 3.15)
SPEED_CONFIGS = {
    'default':  [],                                  # --workers auto, EDM's exact fp32
    'aot0':     ['--aot=0'],                         # plain EDM noise, same loop
    'fast':     FAST,
}
SEED_SPREAD = ('seed1', ['--seed=1'])                # check 10: the default again with another seed; its loss curve gives the seed spread
EXTRA_CONFIGS = {                                    # check 9, on request: figures, no goals
    'tf32':     ['--tf32'],
    'bf16':     ['--bf16'],
    'fp16':     ['--fp16=1'],
    'workers0': ['--workers=0'],                     # pools built in the training process, on the GPU
    'lap':      ['--aot-solver=lap'],                # the optional solver, when its package is installed
}
OPTIONAL = {'lap': 'lap'} # config: the package it needs

# Per mode: time budgets (s) of the checks, and sizes. Time a step leaves unused goes to the next
# ones. GPU: preflight 20 + check 2 310 + the parallel phase 180 = 510 s (docs/benchmarks.md).
SIZES = {
    'gpu': dict(
        budgets={0: 20, 2: 310, 10: 180, 1: 180, 4: 180, 3: 180, 6: 180, 7: 180, 5: 180, 8: 180, 9: 330},
        res=32, jobs=None, extra=None,
        speed='--arch=ddpmpp --batch=64 --augment=0.12 --aot=512 --cond=0', first=0.064, tick=0.512, ticks=4,
        ddp='--arch=ncsnpp --batch=32 --aot=32 --cond=0 --workers=1', ddp_kimg=0.128, ddp_procs=(1, 2),
        net='--arch=ddpmpp --cbase=32 --cres=1,2 --batch=64 --aot=64 --cond=0 --workers=1', net_kimg=0.256,
        seeds=64, batches=(64, 23), dg='--batch=32 --kimg=0.256 --snap=0.128', ot_targets=64, fid='',
        ot_fit=dict(targets=20000, res=32, steps=3),
        pools=dict(pool=512, batch=64, rounds=3, net=dict(model_channels=128, channel_mult=[2, 2, 2])),
        scale=dict(large='2048,16384', exact=2048, reference_k=64, goal_pool=16384, goal_sec=2.0),
        fewstep=dict(net=dict(img_resolution=32, model_channels=128, channel_mult=[2, 2, 2]), seeds=64, batches=(64, 23),
                     search='--steps=11', speed='--batch=64 --steps=11 --rounds=2 --search-rounds=1 --search-seeds=0-127')),
    'smoke': dict(
        budgets={0: 120, 2: 300, 10: 400, 1: 400, 4: 400, 3: 400, 6: 400, 7: 400, 5: 400, 8: 400, 9: 300},
        res=8, jobs=2, extra=['lap'], # check 9: the optional-package path
        # Start-up is most of a tiny run's cost: few processes, no DataLoader workers.
        speed='--arch=ddpmpp --cbase=16 --cres=1 --batch=16 --augment=0.12 --aot=16 --cond=0 --workers=0', first=0.016, tick=0.016, ticks=3,
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
MAX_LEVELS = 1 # PNGs at two batch sizes: uint8 levels they may differ by (GPU kernels are chosen per shape)
DIGITS = os.path.join(ROOT, 'datasets', 'uci-digits-16x16.zip')
PY = sys.executable
REPORT_LINES = 40 # of a failing program's output in the report; its whole log is in the tar beside it

def installed(package):
    """Whether `package` imports here (a stand-in module that raises ImportError hides it)."""
    try:
        importlib.import_module(package)
        return True
    except ImportError:
        return False

#----------------------------------------------------------------------------
# Running programs under a check's budget, and making sure none outlives gpu_check.

class CheckFailed(Exception):
    pass

def failure(err):
    """A failure's first line, and the rest (a program's last output lines) as a markdown code block."""
    first, *rest = str(err).split('\n', 1)
    return first, (['```', rest[0], '```'] if rest else [])

def tail(text, lines=REPORT_LINES):
    return '\n'.join(text.rstrip().splitlines()[-lines:])

def kill_tree(pid):
    """SIGKILL a program and everything it started, also what runs in sessions of its own (torchrun's
    workers): the tree is read before anything is killed, so nothing is orphaned first."""
    try:
        procs = [psutil.Process(pid)]
        procs += procs[0].children(recursive=True)
    except psutil.Error:
        procs = []
    with contextlib.suppress(OSError):
        os.killpg(pid, signal.SIGKILL)
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.kill()

# The watchdog: a small process in a session of its own that reads "pid start-time" lines on a pipe
# from gpu_check. When the pipe closes (gpu_check ended, however: even SIGKILL), it kills the trees
# of the programs still running. Only os and psutil: it starts in a fraction of a second.
WATCHDOG = '''
import os, signal, sys, psutil
pids = {}
for line in sys.stdin:
    pid, created = line.split()
    pids[int(pid)] = float(created)
for pid, created in pids.items():
    try:
        p = psutil.Process(pid)
        if abs(p.create_time() - created) > 0.01:
            continue
        procs = [p] + p.children(recursive=True)
    except psutil.Error:
        continue
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass
    for q in procs:
        try:
            q.kill()
        except psutil.Error:
            pass
'''

class Watchdog:
    def __init__(self):
        self.proc = subprocess.Popen([PY, '-c', WATCHDOG], stdin=subprocess.PIPE, text=True, start_new_session=True)
        self.lock = threading.Lock()

    def watch(self, pid):
        with self.lock, contextlib.suppress(OSError, psutil.Error):
            self.proc.stdin.write(f'{pid} {psutil.Process(pid).create_time()}\n')
            self.proc.stdin.flush()

    def close(self):
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=30)

class Shared:
    """What every check's Context shares across threads: the log counter, the program slots, the watchdog."""
    def __init__(self, jobs, watchdog):
        self.lock, self.logs, self.slots, self.watchdog, self.procs = threading.Lock(), 0, threading.BoundedSemaphore(jobs), watchdog, set()
        self.digits, self.digits_lock = None, threading.Lock()

class Context:
    """What the checks share: the mode, the work folder, the data; and this check's number and deadline."""

    def __init__(self, smoke, workdir, start, jobs=1, watchdog=None):
        self.smoke, self.workdir, self.start = smoke, workdir, start
        self.size = SIZES['smoke' if smoke else 'gpu']
        self.cuda = torch.cuda.is_available()
        self.deadline, self.num = math.inf, 0
        self.shared = Shared(jobs, watchdog)
        self.broken = [t.strip() for t in os.environ.get('GPU_CHECK_BREAK', '').split(',') if t.strip()]

    def for_check(self, num, deadline):
        ctx = copy.copy(self)
        ctx.num, ctx.deadline = num, deadline
        return ctx

    def say(self, text):
        print(f'[{time.time() - self.start:5.0f}s] {text}', flush=True)

    def path(self, *parts):
        return os.path.join(self.workdir, *parts)

    def sh(self, cmd, what, env=None):
        """Run cmd in the repository root within the check's budget; its output, or CheckFailed."""
        if any(text in what for text in self.broken):
            cmd = [PY, '-c', f'import sys; print("broken on purpose: GPU_CHECK_BREAK matches {what!r}"); sys.exit(3)']
        if not self.shared.slots.acquire(timeout=max(0.0, self.deadline - time.time() - 1)):
            raise CheckFailed(f'{what}: no time left in the check\'s budget')
        try:
            left = self.deadline - time.time()
            if left <= 1:
                raise CheckFailed(f'{what}: no time left in the check\'s budget')
            with self.shared.lock:
                self.shared.logs += 1
                name = f'{self.shared.logs:03d}-check{self.num}-' + re.sub(r'[^A-Za-z0-9._-]+', '_', what)[:60].strip('_') + '.log'
            self.say(f'  {what} (logs/{name})')
            log = self.path('logs', name)
            with open(log, 'w') as f:
                f.write(shlex.join(cmd) + '\n')
                f.flush()
                proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
                with self.shared.lock:
                    self.shared.procs.add(proc.pid)
                if self.shared.watchdog:
                    self.shared.watchdog.watch(proc.pid)
                try:
                    rc = proc.wait(timeout=left)
                except subprocess.TimeoutExpired:
                    rc = None
                finally: # also on Ctrl-C and SIGTERM: torchrun's and pytest's children go with it
                    if proc.poll() is None or rc is None:
                        kill_tree(proc.pid)
                    proc.wait()
                    with self.shared.lock:
                        self.shared.procs.discard(proc.pid)
        finally:
            self.shared.slots.release()
        out = open(log).read()
        if rc is None:
            raise CheckFailed(f'{what}: stopped at the check\'s budget ({left:.0f}s left when it started; logs/{name})\n{tail(out)}')
        if rc != 0:
            raise CheckFailed(f'{what}: exit status {rc} (logs/{name})\n{tail(out)}')
        return out

    def kill_all(self):
        with self.shared.lock:
            pids = list(self.shared.procs)
        for pid in pids:
            kill_tree(pid)

    def digits(self):
        """The bundled digits as res x res RGB PNGs with their labels, made once for every check."""
        with self.shared.digits_lock:
            if self.shared.digits is None:
                self.shared.digits = make_digits(self.path('digits'), self.size['res'])
        return self.shared.digits

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
    """train.py for kimg from a fixed seed, saving no snapshots, states or grids (add --snap=1 for snapshots)."""
    launcher = [PY, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={torchrun}'] if torchrun else [PY]
    return [*launcher, 'train.py', f'--outdir={run_dir}', '--nosubdir', f'--data={ctx.digits()}', f'--duration={kimg / 1000:.9f}',
            f'--tick={tick or kimg}', '--snap=0', '--dump=0', '--dump-minutes=0', '--grid=0', '--seed=0', *args]

class Steps:
    """The steps of one check, each in its own try and thread: a failure is reported with its figure
    and the steps that do not need it still run. start(name, fn, *needs) -> a future of fn's value;
    fn gets the values of the steps it needs and returns (value, figure)."""
    FAILED = object()

    def __init__(self, ctx):
        self.ctx, self.rows, self.lock = ctx, [], threading.Lock()
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=32) # most of them wait for the steps they need

    def start(self, name, fn, *needs):
        with self.lock:
            row = dict(name=name, status='not run', figure='', output=[])
            self.rows.append(row)
        def run():
            values = [need.result() for need in needs]
            if any(v is Steps.FAILED for v in values):
                row.update(status='not run', figure='needs a step that failed')
                return Steps.FAILED
            try:
                value, figure = fn(*values)
                row.update(status='ok', figure=figure)
                return value
            except CheckFailed as err:
                first, output = failure(err)
                row.update(status='FAILED', figure=first, output=output)
            except Exception as err: # a bug in a step fails that step
                row.update(status='FAILED', figure=f'{type(err).__name__}: {err}')
            return Steps.FAILED
        return self.pool.submit(run)

    def finish(self):
        """(every step ok, markdown lines: one per step, with a failing program's output)."""
        self.pool.shutdown(wait=True)
        lines = []
        for row in self.rows:
            lines += [f'- {row["name"]}: {row["status"]}' + (f': {row["figure"]}' if row['figure'] else '')]
            lines += ['', *row['output'], ''] if row['output'] else []
        return all(row['status'] == 'ok' for row in self.rows), lines

#----------------------------------------------------------------------------
# Check 0: preflight.

PREFLIGHT = '''
import json, sys, time
start = time.time()
import numpy, scipy, torch
import training.training_loop
imported = time.time() - start
device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
torch.zeros(1, device=device).sum().item()
ready = time.time() - start
try:
    import lap
    lap_version = getattr(lap, '__version__', 'installed')
except ImportError:
    lap_version = None
gpu = torch.cuda.get_device_properties(device) if device.type == 'cuda' else None
print(json.dumps(dict(python=sys.version.split()[0], torch=torch.__version__, cuda=torch.version.cuda,
    cudnn=torch.backends.cudnn.version() if device.type == 'cuda' else None, numpy=numpy.__version__, scipy=scipy.__version__,
    lap=lap_version, gpu=gpu.name if gpu else None, gpu_gb=gpu.total_memory / 2**30 if gpu else None,
    imported=imported, ready=ready)))
'''

def check_preflight(ctx):
    """Versions, and what start-up costs: the training imports and CUDA in one interpreter, and one train.py --dry-run."""
    out = ctx.sh([PY, '-c', PREFLIGHT], 'versions, imports and CUDA start-up')
    v = json.loads(out.strip().splitlines()[-1])
    start = time.time()
    ctx.sh(train_cmd(ctx, ctx.path('preflight'), ctx.size['first'], ctx.size['speed'].split() + ['--dry-run']), 'train.py --dry-run (start-up)')
    dry = time.time() - start
    versions = (f'Python {v["python"]}, torch {v["torch"]}, CUDA {v["cuda"] or "none"}, cuDNN {v["cudnn"] or "-"}, numpy {v["numpy"]}, '
                f'scipy {v["scipy"]}, lap {v["lap"] or "not installed"}; ' + (f'{v["gpu"]} ({v["gpu_gb"]:.0f} GB)' if v['gpu'] else 'no GPU')
                + f', {os.cpu_count()} CPU cores')
    summary = f'imports {v["imported"]:.1f} s, CUDA ready at {v["ready"]:.1f} s, train.py --dry-run {dry:.1f} s; lap {"yes" if v["lap"] else "no"}'
    lines = [f'- {versions}', f'- start-up: {summary} (the budgets assume 37-58 s per train.py run outside steady training, '
             'docs/benchmarks.md; a much slower start-up here means the later checks may run out of time)']
    return True, summary, lines

#----------------------------------------------------------------------------
# Check 1: tests, one pytest process per group, side by side.

def run_tests(ctx, group, tests):
    xml_path = ctx.path(f'pytest-{group}.xml')
    ctx.sh([PY, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', f'--junitxml={xml_path}', *tests], f'pytest {group}: ' + ' '.join(t.split('::')[-1] for t in tests))
    return xml_path

def read_junit(xml_path):
    """{test name (with its parameters): passed | failed | skipped} from a junit XML."""
    root = xml.etree.ElementTree.parse(xml_path).getroot()
    verdicts = {}
    for case in root.iter('testcase'):
        kinds = {child.tag for child in case}
        verdicts[case.get('name')] = 'failed' if kinds & {'failure', 'error'} else 'skipped' if 'skipped' in kinds else 'passed'
    return verdicts

def check_tests(ctx):
    groups = SMOKE_TESTS if ctx.smoke else CUDA_TESTS
    steps = Steps(ctx)
    for group, tests in groups.items():
        def one(group=group, tests=tests):
            try:
                path = run_tests(ctx, group, tests)
            except CheckFailed:
                path = ctx.path(f'pytest-{group}.xml')
                if not os.path.exists(path): # stopped, or pytest itself broke: no verdict per test
                    raise
            verdicts = read_junit(path)
            counts = {k: sum(v == k for v in verdicts.values()) for k in ['passed', 'failed', 'skipped']}
            figure = ', '.join(f'{n} {k}' for k, n in counts.items() if n) + ': ' + ', '.join(f'{t} {v}' for t, v in verdicts.items())
            missing = [t for t in tests if not any(v.split('[')[0] == t.split('::')[-1] for v in verdicts)] # parametrized: test[params]
            if counts['failed'] or missing or (ctx.cuda and counts['skipped']):
                raise CheckFailed(figure + (f'; no verdict for {", ".join(missing)}' if missing else '')
                                  + (' (a skip on a CUDA machine: the test did not run)' if ctx.cuda and counts['skipped'] else ''))
            return verdicts, figure + ('' if ctx.cuda else ' (no CUDA here: skips expected)')
        steps.start(f'pytest {group} ({len(tests)} tests)', one)
    ok, lines = steps.finish()
    n = sum(len(tests) for tests in groups.values())
    summary = f'{sum(r["status"] == "ok" for r in steps.rows)} of {len(groups)} groups passed ({n} tests)'
    return ok, summary, lines

#----------------------------------------------------------------------------
# Checks 2, 10, 9: training throughput, the loss curves, the other modes.

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

def speed(run, base):
    return base['sec_per_kimg'] / run['sec_per_kimg']

def curve(run, base):
    """Mean distance between two loss curves (loss per tick)."""
    return float(np.mean(np.abs(np.subtract(run['losses'], base['losses']))))

def goal(runs, label, needs, text, met):
    lost = [name for name in needs if name not in runs]
    if lost:
        return f'{label}: not measured (no {", ".join(lost)} run)', False
    return f'{label}: {text()}', bool(met())

def speed_goals(runs):
    """[(goal line, met)] of check 2 from the runs' figures (read_run); a goal whose runs are missing is not met."""
    d, a, f = (runs.get(name) for name in ['default', 'aot0', 'fast'])
    return [
        goal(runs, 'default aot_wait', ['default'], lambda: f'{d["aot_wait"]:.2%} (goal <= 1%)', lambda: d['aot_wait'] <= 0.01),
        goal(runs, 'default sec/kimg', ['default', 'aot0'], lambda: f'{d["sec_per_kimg"]:.3f} (goal <= --aot 0\'s {a["sec_per_kimg"]:.3f} x 1.02)',
             lambda: d['sec_per_kimg'] <= a['sec_per_kimg'] * 1.02),
        goal(runs, 'fast throughput', ['default', 'fast'], lambda: f'{speed(f, d):.2f}x the default (goal >= 2x)', lambda: speed(f, d) >= 2),
    ]

def curve_goal(runs):
    """(goal line, met) of check 10: the fast run's loss curve within the seed spread."""
    d, f, s = (runs.get(name) for name in ['default', 'fast', SEED_SPREAD[0]])
    return goal(runs, 'fast loss curve', ['default', 'fast', SEED_SPREAD[0]], lambda: f'mean |fast - default| per tick {curve(f, d):.4f} '
                f'(goal <= the seed spread: mean |seed 1 - seed 0| {curve(s, d):.4f})', lambda: curve(f, d) <= curve(s, d))

def speed_run(ctx, name, flags):
    """One train.py run of the speed configuration plus flags; its figures (read_run), or CheckFailed."""
    s = ctx.size
    kimg = s['first'] + s['tick'] * s['ticks']
    if '--compile' in flags and not ctx.cuda:
        flags = [f for f in flags if f != '--compile'] # torch.compile is timed on the GPU only
    run_dir = ctx.path('speed', name)
    ctx.sh(train_cmd(ctx, run_dir, kimg, s['speed'].split() + flags, tick=s['tick']), f'train.py {name}: {" ".join(flags) or "(defaults)"}')
    return read_run(run_dir), flags

def speed_table(ctx, runs, flags):
    s = ctx.size
    lines = [f'`train.py {s["speed"]}` on the digits at {s["res"]}x{s["res"]} RGB, {s["first"] + s["tick"] * s["ticks"]:g} kimg per run; steady '
             f'state = ticks of {s["tick"]:g} kimg after the first {WARMUP_TICKS} (start-up and compilation excluded).', '',
             '| config | options | sec/kimg | aot_wait | peak GPU mem (GB) | speed vs default | mean loss |', '|---|---|---:|---:|---:|---:|---:|']
    for name, run in runs.items():
        ratio = f'{speed(run, runs["default"]):.2f}x' if 'default' in runs else '-'
        lines.append(f'| {name} | {" ".join(flags[name]) or "-"} | {run["sec_per_kimg"]:.3f} | {run["aot_wait"]:.2%} | '
                     f'{run["peak_gb"]:.2f} | {ratio} | {np.mean(run["losses"]):.4f} |')
    return lines

def run_configs(ctx, configs):
    """The configs one after the other (each alone on the GPU: they are timed); ({name: figures}, {name: flags}, notes)."""
    runs, flags, notes = {}, {}, []
    for name, config in configs.items():
        if name in OPTIONAL and not installed(OPTIONAL[name]):
            notes.append(f'- {name}: skipped, the optional {OPTIONAL[name]} package is not installed (pip install {OPTIONAL[name]})')
            continue
        try:
            runs[name], flags[name] = speed_run(ctx, name, config)
        except CheckFailed as err:
            first, output = failure(err)
            notes += [f'- {name} failed: {first}', '', *output, '']
            continue
        if name == 'fast' and flags[name] != config:
            notes.append('- fast ran without --compile: no CUDA here (torch.compile is timed on the GPU only).')
        ctx.say(f'    {name}: {runs[name]["sec_per_kimg"]:.3f} sec/kimg, aot_wait {runs[name]["aot_wait"]:.1%}')
    return runs, flags, notes

def check_speed(ctx):
    runs, flags, notes = run_configs(ctx, SPEED_CONFIGS)
    goals = speed_goals(runs)
    lines = speed_table(ctx, runs, flags) + [''] + [f'- {"met" if met else "MISSED"}: {line}' for line, met in goals] + [''] + notes
    summary = ', '.join(f'{name} {run["sec_per_kimg"]:.2f}' for name, run in runs.items()) + ' sec/kimg'
    ok = len(runs) == len(SPEED_CONFIGS) and (ctx.smoke or all(met for _, met in goals)) # smoke: a CPU's speed proves nothing
    return ok, summary, lines

def check_curve(ctx):
    """The default configuration again with another seed (beside the other checks: only its losses
    count, per tick at fixed kimg), against check 2's default and fast runs read from their folders."""
    runs, notes = {}, []
    for name in ['default', 'fast']:
        try:
            runs[name] = read_run(ctx.path('speed', name))
        except (OSError, CheckFailed) as err:
            notes.append(f'- no {name} run of check 2 to compare with: {str(err).splitlines()[0]}')
    name, flags = SEED_SPREAD
    try:
        runs[name], _ = speed_run(ctx, name, flags)
    except CheckFailed as err:
        first, output = failure(err)
        notes += [f'- {name} failed: {first}', '', *output, '']
    line, met = curve_goal(runs)
    losses = ['| tick | ' + ' | '.join(runs) + ' |', '|---:|' + '---:|' * len(runs)]
    losses += [f'| {i} | ' + ' | '.join(f'{r["losses"][i]:.4f}' if i < len(r['losses']) else '-' for r in runs.values()) + ' |'
               for i in range(max([len(r['losses']) for r in runs.values()] or [0]))]
    lines = ['Loss per tick (same kimg in every run):', '', *losses, '', f'- {"met" if met else "MISSED"}: {line}', *notes]
    return len(runs) == 3 and (ctx.smoke or met), line.split(': ', 1)[1], lines

def check_extra_modes(ctx):
    names = ctx.size['extra'] or list(EXTRA_CONFIGS)
    runs, flags, notes = run_configs(ctx, {'default': [], **{name: EXTRA_CONFIGS[name] for name in names}})
    summary = ', '.join(f'{name} {run["sec_per_kimg"]:.2f}' for name, run in runs.items()) + ' sec/kimg'
    expected = 1 + sum(not (name in OPTIONAL and not installed(OPTIONAL[name])) for name in names)
    return len(runs) == expected, summary, speed_table(ctx, runs, flags) + [''] + notes

#----------------------------------------------------------------------------
# Check 3: torchrun, one process and two sharing the GPU, side by side.

def check_ddp(ctx):
    s = ctx.size
    # One visible GPU, also on a machine with more: the ranks must share it.
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=os.environ.get('CUDA_VISIBLE_DEVICES', '0').split(',')[0]) if ctx.cuda else None
    steps = Steps(ctx)
    for nproc in s['ddp_procs']:
        def one(nproc=nproc):
            out = ctx.sh(train_cmd(ctx, ctx.path(f'ddp{nproc}'), s['ddp_kimg'], s['ddp'].split(), torchrun=nproc),
                         f'torchrun --nproc_per_node={nproc} train.py {s["ddp"]}', env=env)
            fallbacks = [line.strip() for line in out.splitlines() if 'Warning (rank' in line] # torchrun may prefix the ranks' lines
            if nproc > 1 and f'weights identical on all {nproc} ranks' not in out:
                raise CheckFailed(f'{nproc} processes: no rank check in the output\n{tail(out)}')
            if ctx.cuda and len(fallbacks) != (nproc if nproc > 1 else 0):
                raise CheckFailed(f'{nproc} process(es) on one GPU: {len(fallbacks)} ranks said they fall back to gloo\n{tail(out)}')
            return None, ('weights identical on all ranks' if nproc > 1 else 'trained') + ''.join(f'; `{line}`' for line in fallbacks)
        steps.start(f'torchrun, {nproc} process{"es" if nproc > 1 else ""}', one)
    ok, lines = steps.finish()
    return ok, '; '.join(f'{r["name"]}: {r["status"]}' for r in steps.rows), lines

#----------------------------------------------------------------------------
# Check 4: generate.py and fid.py, the independent steps side by side.

def read_pngs(folder):
    names = sorted(n for n in os.listdir(folder) if n.endswith('.png'))
    return {n: np.asarray(PIL.Image.open(os.path.join(folder, n))) for n in names}

def compare_pngs(a, b):
    """(identical, compared, largest difference in uint8 levels) of the PNGs in two folders' {name: array}."""
    common = [n for n in a if n in b and a[n].shape == b[n].shape]
    same = sum(np.array_equal(a[n], b[n]) for n in common)
    largest = max([int(np.abs(a[n].astype(np.int16) - b[n].astype(np.int16)).max()) for n in common] or [0])
    return same, len(common), largest

def two_batches(steps, ctx, sample, seeds, batches, name):
    """Steps: generate.py (the arguments in sample) for seeds 0 .. seeds-1 at each batch size, side by
    side, then the comparison: identical PNGs out of seeds and the largest difference, a figure (the
    GPU promises no bit-exactness across batch sizes); more than MAX_LEVELS apart fails the step.
    Returns the futures of the two runs (their folders) and of the comparison."""
    def gen(batch):
        folder = ctx.path(f'{name}{batch}')
        ctx.sh([PY, *sample, f'--outdir={folder}', f'--seeds=0-{seeds - 1}', f'--batch={batch}'], f'generate.py {shlex.join(sample[2:])} --batch={batch}')
        return folder, f'{len(read_pngs(folder))} PNGs'
    runs = [steps.start(f'generate.py at batch {batch}', lambda batch=batch: gen(batch)) for batch in batches]
    def compare(*folders):
        a, b = (read_pngs(folder) for folder in folders)
        same, common, largest = compare_pngs(a, b)
        figure = f'{same}/{seeds} PNGs identical at batch {batches[0]} and {batches[1]}, largest difference {largest} levels ({len(a)} and {len(b)} written)'
        if not (len(a) == len(b) == common == seeds) or largest > MAX_LEVELS:
            raise CheckFailed(f'{figure}; allowed: {MAX_LEVELS} level')
        return (same, largest), figure
    return runs, steps.start(f'the same PNGs at batch {batches[0]} and {batches[1]} (up to {MAX_LEVELS} level)', compare, *runs)

def count_pngs(folder, expected):
    written = len(read_pngs(folder))
    if written != expected:
        raise CheckFailed(f'{written} images written in {folder}, expected {expected}')
    return written, f'{written} images'

def check_generate(ctx):
    s = ctx.size
    steps = Steps(ctx)
    def train():
        ctx.sh(train_cmd(ctx, ctx.path('net'), s['net_kimg'], s['net'].split() + ['--snap=1']), f'train.py {s["net"]} (a network to sample)')
        net = ctx.path('net', sorted(n for n in os.listdir(ctx.path('net')) if n.startswith('network-snapshot-') and n.endswith('.pkl'))[-1])
        return net, os.path.basename(net)
    net = steps.start('train.py: a network to sample', train)
    sample = lambda net: ['generate.py', f'--network={net}', '--rho=90', '--steps=14']
    # The two batch sizes need the network: a step that waits for it, then starts them.
    batches = steps.start('start generate.py at two batch sizes', lambda net: (two_batches(steps, ctx, sample(net), s['seeds'], s['batches'], 'gen'), 'started'), net)
    def fakes():
        runs, _ = batches.result()
        folder = runs[0].result()
        if folder is Steps.FAILED:
            raise CheckFailed(f'generate.py at batch {s["batches"][0]} failed')
        return folder
    def disc(folder):
        ctx.sh([PY, 'train_discriminator.py', f'--data={ctx.digits()}', f'--fakes={folder}', f'--outdir={ctx.path("disc")}', *s['dg'].split()], 'train_discriminator.py')
        return ctx.path('disc', 'discriminator.safetensors'), 'trained'
    def dg(net, disc):
        ctx.sh([PY, *sample(net), f'--outdir={ctx.path("gen-dg")}', '--seeds=0-7', f'--dg={disc}'], 'generate.py --dg')
        return count_pngs(ctx.path('gen-dg'), 8)
    def ot_map(net):
        ctx.sh([PY, 'tools/ot_map.py', f'--network={net}', '--source=ode', '--sigma-T=5', f'--targets={s["ot_targets"]}', '--target-steps=4',
                '--fit-steps=20', f'--out={ctx.path("map.safetensors")}'], 'tools/ot_map.py')
        return ctx.path('map.safetensors'), 'fitted'
    def ot_gen(net, path):
        ctx.sh([PY, 'generate.py', f'--network={net}', f'--outdir={ctx.path("gen-ot")}', '--seeds=0-7', '--steps=6', f'--ot-map={path}'], 'generate.py --ot-map')
        return count_pngs(ctx.path('gen-ot'), 8)
    def fid_ref():
        ref = ctx.path('ref.npz')
        ctx.sh([PY, 'fid.py', 'ref', f'--data={ctx.digits()}', f'--dest={ref}', '--detector=standin', *s['fid'].split()], 'fid.py ref --detector=standin')
        return ref, 'written'
    def fid_calc(ref, folder):
        out = ctx.sh([PY, 'fid.py', 'calc', f'--images={folder}', f'--ref={ref}', f'--num={s["seeds"]}', '--detector=standin', *s['fid'].split()],
                     'fid.py calc --detector=standin')
        return None, '`' + next((line.strip() for line in reversed(out.splitlines()) if 'FID' in line), 'no FID line') + '`'
    first_batch = steps.start(f'PNGs of batch {s["batches"][0]} (fakes for DG and FID)', lambda _: (fakes(), 'written'), batches)
    d = steps.start('train_discriminator.py', disc, first_batch)
    steps.start('generate.py --dg', dg, net, d)
    m = steps.start('tools/ot_map.py', ot_map, net)
    steps.start('generate.py --ot-map', ot_gen, net, m)
    ref = steps.start('fid.py ref', fid_ref)
    steps.start('fid.py calc', fid_calc, ref, first_batch)
    _ = batches.exception() # the comparison step is started inside: wait until it exists before finishing
    ok, lines = steps.finish()
    compared = next((r for r in steps.rows if r['name'].startswith('the same PNGs')), None)
    failed = [r['name'] for r in steps.rows if r['status'] != 'ok']
    summary = (compared['figure'] if compared else 'no PNG comparison') + ('; failed or not run: ' + ', '.join(failed) if failed else '; --dg, --ot-map, stand-in FID ran')
    return ok, summary, lines

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
           f'ot_start.fit_potentials: {p["targets"]} targets of 3x{p["res"]}x{p["res"]}, {p["steps"]} Adam steps')
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
    # The training loop's default numerics (EDM's exact fp32: no TF32), so the load is the default's step.
    torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = True, False, False
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
             f'load: training steps of DDPM++ at batch {p["batch"]} ({r["step_sec"]:.3f} s each; one pool feeds {p["pool"] // p["batch"]} steps). '
             'Measured beside the correctness checks: an upper bound.', '',
             '| classes | idle (s) | under load (s) | load / idle |', '|---:|---:|---:|---:|']
    lines += [f'| {row["classes"]} | {row["idle"]:.3f} | {row["loaded"]:.3f} | {row["loaded"] / row["idle"]:.2f} |' for row in r['rows']]
    lines += [''] + [f'- {"met" if met else "MISSED"}: {line}' for line, met in goals]
    summary = ', '.join(f'{row["classes"]} cl. {row["idle"]:.2f}/{row["loaded"]:.2f} s' for row in r['rows']) + ' (idle/under load)'
    return ctx.smoke or all(met for _, met in goals), summary, lines

#----------------------------------------------------------------------------
# Check 7: AOT at scale.

def table_rows(out, first):
    return [line for line in out.splitlines() if line.startswith(first)]

def check_aot_scale(ctx):
    p = ctx.size['scale']
    device = 'cuda' if ctx.cuda else 'cpu'
    solvers = ['scipy'] + (['lap'] if installed('lap') else []) # the exact solvers: lap only where it is installed
    out = ctx.sh([PY, 'bench/aot_cost.py', '--pools=', '--no-builds', '--no-train', '--no-doc', f'--solvers={",".join(solvers)}',
                  f'--large-pools={p["large"]}', '--large-ks=32', f'--exact-max={p["exact"]}', f'--reference-k={p["reference_k"]}', f'--device={device}'],
                 f'solver knn at pools {p["large"]} on {device}, exact: {"/".join(solvers)}')
    rows = table_rows(out, '| ')
    knn = [r for r in rows if r.split('|')[2].strip() == 'knn k=32']
    cells = {int(r.split('|')[1].replace(',', '')): r.split('|') for r in knn}
    if p['goal_pool'] not in cells or p['exact'] not in cells:
        raise CheckFailed(f'no knn rows for pools {p["exact"]} and {p["goal_pool"]} in the bench output\n{tail(out)}')
    seconds = float(cells[p['goal_pool']][3])
    kept = float(cells[p['exact']][7])
    goals = [(f'knn pairs {p["goal_pool"]} in {seconds:.2f} s (goal about a second: <= {p["goal_sec"]} s)', seconds <= p['goal_sec']),
             (f'knn keeps {kept:.4f} of the exact pairing\'s gain at {p["exact"]} (goal: cost within 1%, i.e. gain kept >= 0.99 here)', kept >= 0.99)]
    lines = [f'Solver `knn` on the {device} (`bench/aot_cost.py`, random 3x32x32; exact solvers {", ".join(solvers)} up to '
             f'{p["exact"]}, above it knn at k = {p["reference_k"]} is the reference; measured beside the correctness checks: '
             'the times are upper bounds):', '', rows[0], table_rows(out, '|---')[0], *rows[1:],
             ''] + [f'- {"met" if met else "MISSED"}: {line}' for line, met in goals]
    lines += [] if 'lap' in solvers else ['- lap is not installed here: exact reference by scipy only.']
    summary = f'knn {p["goal_pool"]}: {seconds:.2f} s, gain kept {kept:.4f} at {p["exact"]}; exact by {"/".join(solvers)}'
    return ctx.smoke or all(met for _, met in goals), summary, lines

#----------------------------------------------------------------------------
# Check 8: few-step sampling on CUDA, the independent steps side by side.

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
    steps = Steps(ctx)
    _, compared = two_batches(steps, ctx, ['generate.py', f'--network={net}', '--solver=ipndm', '--steps=11'], p['seeds'], p['batches'], 'fs')
    levels = ctx.path('levels.json')
    def search():
        out = ctx.sh([PY, 'tools/schedule_search.py', f'--network={net}', *p['search'].split(), f'--out={levels}'], 'tools/schedule_search.py')
        report_lines = [line.strip() for line in out.splitlines() if ' levels for ' in line or ' error against ' in line]
        return levels, '; '.join(report_lines) or 'ran'
    def searched(levels):
        ctx.sh([PY, 'generate.py', f'--network={net}', '--solver=ipndm', f'--sigmas={levels}', '--seeds=0-7', f'--outdir={ctx.path("fs-searched")}'],
               'generate.py --sigmas=the searched levels')
        return count_pngs(ctx.path('fs-searched'), 8)
    verdict = {}
    def bench():
        out = ctx.sh([PY, 'bench/fewstep_speed.py', f'--network={net}', *p['speed'].split(), '--no-doc'], 'bench/fewstep_speed.py')
        lines = [line for line in out.splitlines() if line.startswith('Lowest ') or line.startswith('Search at ')]
        loop = [line for line in lines if line.startswith('Lowest ')]
        if not loop:
            raise CheckFailed(f'no verdict line in the bench output\n{tail(out)}')
        verdict.update(met=': meets the goal' in loop[0], loop=loop[0], lines=lines,
                       rows=[line for row in table_rows(out, '|') for line in ([''] if row.startswith('| what') else []) + [row]]) # two tables
        return None, loop[0].split(': ', 1)[1]
    found = steps.start('tools/schedule_search.py', search)
    steps.start('generate.py --sigmas', searched, found)
    steps.start('bench/fewstep_speed.py', bench)
    ok, lines = steps.finish()
    if verdict:
        lines += ['', f'`bench/fewstep_speed.py {p["speed"]}` on a conditional DDPM++ of {p["net"]["img_resolution"]}x{p["net"]["img_resolution"]}x3 '
                  '(random weights; on CUDA the verdict is the direct ratio, wall time with the writes in their thread; measured beside '
                  'the correctness checks):', '', *verdict['rows'], '', *verdict['lines']]
    row = next(r for r in steps.rows if r['name'].startswith('the same PNGs'))
    summary = f'{row["figure"]}; ' + (verdict['loop'].split(': ', 1)[1] if verdict else 'no speed verdict')
    return ok and (ctx.smoke or verdict.get('met', False)), summary, lines

#----------------------------------------------------------------------------
# The order, the report and the logs.

CHECKS = { # number: (title, function)
    0: ('preflight: versions, start-up', check_preflight),
    2: ('training throughput and goals', check_speed),
    10: ('fast loss curve within the seed spread', check_curve),
    1: ('tests that need CUDA, exact resume', check_tests),
    4: ('generate.py, --dg, --ot-map, fid.py', check_generate),
    3: ('torchrun: 1 process, 2 sharing the GPU', check_ddp),
    6: ('pool building under training load', check_pools),
    7: ('AOT at scale: knn solver', check_aot_scale),
    5: ('semi-discrete OT fit at CIFAR scale', check_ot_fit),
    8: ('few-step solvers, schedule search, speed', check_few_step),
    9: ('other training modes (on request)', check_extra_modes),
}
# Phases in the order they run: one after the other alone on the GPU, then side by side (the
# programs wait for one of --jobs slots). Check 9 runs only when --only names it (its runs are
# timed: alone, after the rest).
PHASES = [('alone', [0, 2]), ('side by side', [4, 1, 10, 3, 8, 6, 7, 5]), ('alone', [9])] # side by side: the longest chains start first
DEFAULT = [num for _, nums in PHASES for num in nums if num != 9]

def machine():
    if torch.cuda.is_available():
        return f'{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}'
    return f'CPU only ({os.cpu_count()} cores), torch {torch.__version__}, CUDA {torch.version.cuda or "none"}'

def render(results, smoke, wall, logs=None):
    """The report's markdown: verdict, one row per check, then each check's figures."""
    failed = [str(num) for num, r in results.items() if r['status'] != 'pass']
    verdict = 'PASS' if not failed else f'FAIL (check{"s" if len(failed) > 1 else ""} {", ".join(failed)})'
    lines = ['## GPU check (`bench/gpu_check.py`)', '']
    if smoke:
        lines += ['**SMOKE RUN**: tiny sizes on whatever device is here; it proves the code paths run, its figures prove nothing '
                  'and the goals are shown but not judged.', '']
    lines += [f'**Verdict: {verdict}**, {wall:.0f} s wall.' + (f' Every program\'s whole output: `{logs}`.' if logs else ''), '',
              '| # | check | verdict | seconds | figures |', '|---:|---|---|---:|---|']
    for num, r in results.items():
        lines.append(f'| {num} | {CHECKS[num][0]} | {r["status"]} | {r["seconds"]:.0f} | {r["summary"]} |')
    for num, r in results.items():
        if r['details']:
            lines += ['', f'### {num}. {CHECKS[num][0]}: {r["status"]}', '', *r['details']]
    return '\n'.join(lines) + '\n'

def logs_path(report_path):
    return os.path.splitext(report_path)[0] + '-logs.tar.gz'

PACKED = ('.log', '.txt', '.jsonl', '.json', '.xml') # the logs, stats and options of every run; no images, snapshots or data

def pack_logs(workdir, dest):
    """Every program's log and every run's small files (stats.jsonl, log.txt, options), as one .tar.gz, atomically."""
    with atomic_write(dest) as tmp, tarfile.open(tmp, 'w:gz') as tar:
        for folder, dirs, files in os.walk(workdir):
            dirs[:] = sorted(d for d in dirs if os.path.join(folder, d) != os.path.join(workdir, 'digits'))
            for name in sorted(files):
                path = os.path.join(folder, name)
                if name.endswith(PACKED) and os.path.getsize(path) < 50 * 2**20:
                    tar.add(path, arcname=os.path.join('gpu-check-logs', os.path.relpath(path, workdir)))

class Run:
    """The results so far, written (report and logs) after every check, from any thread."""
    def __init__(self, nums, smoke, report_path, workdir, start):
        self.results = {num: dict(status='not run', seconds=0, summary='', details=[]) for num in nums}
        self.smoke, self.report_path, self.workdir, self.start = smoke, report_path, workdir, start
        self.logs = logs_path(report_path)
        self.stamp = time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())
        self.lock = threading.Lock()

    def write(self):
        with self.lock:
            text = render(self.results, self.smoke, time.time() - self.start, os.path.basename(self.logs))
            with atomic_write(self.report_path) as tmp, open(tmp, 'w') as f:
                f.write(text + f'\n{machine()}, {self.stamp}.\n\n```\n{report.command()}\n```\n')
            with contextlib.suppress(OSError):
                pack_logs(self.workdir, self.logs)

def run_check(ctx, num):
    """(status, summary, details) of one check, its programs stopped at the deadline."""
    fn = CHECKS[num][1]
    try:
        ok, summary, details = fn(ctx)
        return ('pass' if ok else 'fail'), summary, details
    except CheckFailed as err:
        return ('fail', *failure(err))
    except Exception as err: # a bug in the check itself fails that check, not the run
        return 'fail', f'{type(err).__name__}: {err}', []

def one_check(ctx, run, num, deadline):
    begin = time.time()
    ctx.say(f'check {num}: {CHECKS[num][0]}, until {deadline - ctx.start:.0f} s')
    status, summary, details = run_check(ctx.for_check(num, deadline), num)
    with run.lock:
        run.results[num] = dict(status=status, seconds=time.time() - begin, summary=summary, details=details)
    ctx.say(f'check {num}: {status.upper()} in {time.time() - begin:.0f} s: {summary}')
    run.write()

def run_phases(ctx, run, nums):
    """The phases in order: 'alone' checks one after the other, each until its budget (time saved
    goes on); 'side by side' ones in threads, each until the phase's start plus its budget."""
    budgets, deadline = ctx.size['budgets'], ctx.start
    for kind, phase in PHASES:
        phase = [num for num in phase if num in nums]
        if kind == 'alone':
            for num in phase:
                deadline += budgets[num]
                one_check(ctx, run, num, deadline)
        elif phase:
            begin = max(deadline, time.time()) if deadline < math.inf else time.time()
            threads = [threading.Thread(target=one_check, args=(ctx, run, num, begin + budgets[num]), daemon=True) for num in phase]
            for thread in threads:
                thread.start()
            for thread in threads:
                while thread.is_alive(): # join in steps: Ctrl-C and SIGTERM still reach the main thread
                    thread.join(0.5)
            deadline = begin + max(budgets[num] for num in phase)

def interrupt(signum, frame):
    raise KeyboardInterrupt

def parse_only(text):
    try:
        nums = [int(x) for x in text.split(',') if x.strip()]
    except ValueError:
        nums = None
    if not nums or any(n not in CHECKS for n in nums):
        raise click.BadParameter(f'{text!r}: give check numbers from {", ".join(map(str, sorted(CHECKS)))} separated by commas, e.g. --only=2,4', param_hint='--only')
    return nums

#----------------------------------------------------------------------------

@click.command()
@click.option('--only',    help='Run these checks only, after the preflight (report only, docs untouched), e.g. 2,4', metavar='LIST', type=str)
@click.option('--smoke',   help='Tiny sizes, any device: the code paths, not the figures (docs untouched)', is_flag=True)
@click.option('--report',  'report_path', help='Where to write the markdown report; the logs go beside it (<name>-logs.tar.gz)', metavar='FILE', default='gpu-check.md', show_default=True)
@click.option('--workdir', help='Keep the data, runs and logs here  [default: a temporary folder]', metavar='DIR', type=str)
@click.option('--jobs',    help='Programs at a time in the side-by-side phase  [default: the CPU cores; 2 with --smoke]', metavar='INT', type=click.IntRange(min=1))
def main(only, smoke, report_path, workdir, jobs):
    """Check every GPU promise in one command and write the report."""
    nums = sorted({0, *parse_only(only)}, key=list(CHECKS).index) if only else DEFAULT
    if not os.path.isdir(os.path.dirname(os.path.abspath(report_path))):
        raise click.BadParameter(f'the folder of {report_path} does not exist; create it or choose another path', param_hint='--report')
    if workdir and os.path.isdir(workdir) and os.listdir(workdir):
        raise click.BadParameter(f'{workdir} is not empty; give a new or empty folder', param_hint='--workdir')
    if not smoke and not torch.cuda.is_available():
        raise click.ClickException('no CUDA device here: run on a GPU machine, or use --smoke to run the code paths on a CPU')
    docs = not smoke and not only
    env = report.machine()
    print(env, flush=True)
    start = time.time()
    jobs = jobs or SIZES['smoke' if smoke else 'gpu']['jobs'] or os.cpu_count() or 1
    watchdog = Watchdog()
    try:
        with (contextlib.nullcontext(workdir) if workdir else tempfile.TemporaryDirectory()) as work:
            os.makedirs(os.path.join(work, 'logs'), exist_ok=True)
            ctx = Context(smoke, work, start, jobs, watchdog)
            run = Run(nums, smoke, report_path, work, start)
            try:
                run_phases(ctx, run, nums)
            except KeyboardInterrupt:
                ctx.say('interrupted: stopping every program')
                ctx.kill_all()
                with run.lock:
                    for r in run.results.values():
                        if r['status'] == 'not run':
                            r['summary'] = 'interrupted'
            ctx.kill_all()
            run.write()
    finally:
        watchdog.close()
    text = render(run.results, smoke, time.time() - start, os.path.basename(run.logs))
    print(text)
    print(f'Report: {report_path}\nLogs: {run.logs}')
    if docs:
        report.update_section('gpu_check', text, f'{env}, CUDA {torch.version.cuda}')
    sys.exit(0 if all(r['status'] == 'pass' for r in run.results.values()) else 1)

if __name__ == '__main__':
    signal.signal(signal.SIGTERM, interrupt) # a job's time limit ends the run like Ctrl-C: the report is still written
    main()
