"""Train diffusion-based generative models with Approximated Optimal Transport (AOT):
EDM's training with the noise of each image chosen by an optimal assignment within a pool."""

import glob
import json
import os
import re
import sys

import click
import torch

import dnnlib
from metrics.fid import FIDError
from torch_utils import distributed as dist
from training import aot, network_io, pools, training_loop
from training.dataset import DamagedImageError

# Exit status after a stop signal (SIGINT, SIGTERM, SIGUSR1) once the state is saved: EX_TEMPFAIL of
# sysexits.h, "try again later". torchrun exits 1 instead (docs/training.md, "Preemption").
EXIT_INTERRUPTED = 75

# Options of one invocation, not of the run: not recorded, not compared on resume.
PER_INVOCATION = ['resume', 'dry_run']
# Options that change what is watched or saved, never what is trained: a resume may give them anew.
WATCHING = ['metric_every', 'metric_images', 'metric_detector', 'dump_minutes']
# Unconditional pools above this go to --aot-solver=knn: an exact solve grows as the cube of the
# pool (times: docs/training.md, "Choosing the pool size and solver").
MAX_EXACT_POOL = 8192

#----------------------------------------------------------------------------

def parse_int_list(s):
    """'1,2,5-7' -> [1, 2, 5, 6, 7]."""
    if isinstance(s, list):
        return s
    out = []
    for part in s.split(','):
        m = re.fullmatch(r'(\d+)-(\d+)', part)
        out.extend(range(int(m.group(1)), int(m.group(2)) + 1) if m else [int(part)])
    return out

def state_nimg(path):
    """Training images done in a state file: cur_nimg in ours; from the name (kimg) in EDM's,
    which pickle code; -1 for a damaged file."""
    try:
        return int(torch.load(path, map_location='cpu', weights_only=True, mmap=True)['cur_nimg'])
    except Exception: # any damage, or EDM's pickled state
        match = re.search(r'training-state-(\d+)\.pt$', path)
        return int(match.group(1)) * 1000 if match else -1

def latest_state(run_dir):
    """Newest training state in run_dir, or None: the highest training-state-NNNNNN.pt, unless the
    rolling training-state-latest.pt holds more training (it is replaced every --dump-minutes)."""
    numbered = sorted(glob.glob(os.path.join(run_dir, 'training-state-[0-9]*.pt')))
    rolling = os.path.join(run_dir, training_loop.ROLLING_STATE)
    if not os.path.isfile(rolling):
        return numbered[-1] if numbered else None
    if numbered and state_nimg(numbered[-1]) >= state_nimg(rolling):
        return numbered[-1]
    return rolling

def fail(msg):
    raise click.ClickException(msg)

class Workers(click.ParamType):
    """--workers: a count, or 'auto' (resolved in main once the device is known)."""
    name = 'INT|auto'
    def convert(self, value, param, ctx):
        if isinstance(value, int) or value == 'auto':
            return value
        try:
            count = int(value)
        except ValueError:
            count = -1
        if count < 0:
            self.fail(f'{value!r} is neither a count of worker processes (0 or more) nor "auto"', param, ctx)
        return count

def decide_resume(opts):
    """The state file to resume from (None = start afresh), as rank 0 sees the file system."""
    if opts.nosubdir and opts.outdir is not None and opts.resume is None and opts.transfer is None:
        found = latest_state(opts.outdir) # reads the states' progress: once
        if found is not None:
            print(f'Found {found}: resuming from it (pass a new --outdir to start afresh).')
            return found
    if opts.resume is not None and os.path.isdir(opts.resume):
        found = latest_state(opts.resume)
        if found is None:
            fail(f'--resume={opts.resume}: no training-state-*.pt in that directory')
        return found
    return opts.resume

def recorded_options(state):
    """The command-line options recorded in the run folder of a state file; None for run folders
    of older versions and of EDM, whose training_options.json holds only the loop's arguments."""
    try:
        with open(os.path.join(os.path.dirname(state), 'training_options.json')) as f:
            return json.load(f).get('command_line')
    except (OSError, ValueError, AttributeError):
        return None

def comparable(name, value):
    return os.path.abspath(value) if name in ('data', 'outdir') and value is not None else value

def continue_run(opts, given):
    """On rank 0: the options of this invocation and the folder to continue in (None = a new one).
    A state whose run folder records its options continues there with them: options given
    explicitly must agree (every difference is named at once), except a longer --duration and the
    options of WATCHING."""
    if 'transfer' in given and opts.resume is not None:
        fail('--transfer and --resume cannot be specified at the same time')
    state = decide_resume(opts)
    recorded = recorded_options(state) if state is not None else None
    if recorded is None:
        if opts.data is None or opts.outdir is None:
            fail(f'--resume={opts.resume}: its folder records no options (an older train.py\'s or EDM\'s run); give them again, at least '
                 '--data and --outdir (its training_options.json lists them)' if state is not None else
                 '--data and --outdir are needed to start a run; or continue one with --resume=RUN_DIR')
        return dnnlib.EasyDict(opts, resume=state), None
    differ = []
    for name in sorted(given & recorded.keys()):
        if (name == 'duration' and opts.duration >= recorded['duration']) or name in WATCHING:
            continue # training on for longer, or watching it otherwise: allowed
        if comparable(name, opts[name]) != comparable(name, recorded[name]):
            differ.append(f'--{name.replace("_", "-")}={opts[name]} (the run has {recorded[name]})')
    if differ:
        fail(f'{state} continues its run with the options recorded in its folder; these differ: {", ".join(differ)}. Leave them '
             'out (only a longer --duration, --dump-minutes and the --metric-* options may change), or start a new run, e.g. with --transfer=<network-snapshot>.')
    keep = {name: value for name, value in recorded.items() if name in opts and name not in given}
    return dnnlib.EasyDict(opts, **keep, resume=state), os.path.dirname(state)

def on_rank0(fn, *args):
    """fn(*args) evaluated on rank 0 and sent to every rank; an error there stops all ranks alike."""
    result = None
    if dist.get_rank() == 0:
        try:
            result = ('ok', fn(*args))
        except click.ClickException as err:
            result = ('error', err.message)
    result = dist.broadcast_object(result)
    if result[0] == 'error':
        fail(result[1])
    return result[1]

def one_line(err):
    return ' '.join(str(err).split()) or type(err).__name__

def planned_network(c, interface_kwargs):
    """The network this run will build, on the meta device: names and shapes, no memory, no time."""
    with torch.device('meta'):
        return dnnlib.util.construct_class_by_name(**c.network_kwargs, **interface_kwargs)

def state_interface(state):
    """Resolution, channels and classes of the network in one of our training states: recorded in
    it, or read off the tensors in older ones (the first encoder convolution is named by resolution)."""
    if 'img_resolution' in state:
        return {attr: state[attr] for attr in ('img_resolution', 'img_channels', 'label_dim')}
    for name, tensor in state['net'].items():
        match = re.fullmatch(r'model\.enc\.(\d+)x\d+_conv\.weight', name)
        if match:
            label = state['net'].get('model.map_label.weight')
            return dict(img_resolution=int(match.group(1)), img_channels=tensor.shape[1], label_dim=0 if label is None else label.shape[1])
    return {}

def misfit(src, dst, source, strict, interface=None):
    """Why the weights of src (a network, or a state_dict with the interface it was trained for)
    do not fit the network dst, in words; [] when they fit. strict (resume): every tensor must
    match. Otherwise (transfer) tensors that src lacks only in dst's augmentation-label layer may
    start from scratch, as EDM allows."""
    said = []
    if isinstance(src, torch.nn.Module):
        interface = {attr: getattr(src, attr, None) for attr in ('img_resolution', 'img_channels', 'label_dim')}
    for attr, what, show, where in [('img_resolution', 'resolution', lambda r: f'{r}x{r}', '--data'), ('img_channels', 'image channels', str, '--data'),
                                    ('label_dim', 'classes', lambda n: str(n or 'none'), 'this run')]:
        if (interface or {}).get(attr) is not None and interface[attr] != getattr(dst, attr):
            said.append(f'{what} {show(interface[attr])} in {source}, {show(getattr(dst, attr))} in {where}')
    if isinstance(src, torch.nn.Module):
        if type(src).__name__ != type(dst).__name__:
            said.append(f'preconditioning {type(src).__name__} in {source}, {type(dst).__name__} in this run (--precond)')
        # Constructor arguments that shape the tensors; json makes tuples and lists compare equal.
        src_kwargs, dst_kwargs = getattr(src, 'init_kwargs', {}), dst.init_kwargs
        for key in sorted(src_kwargs.keys() & dst_kwargs.keys() - {'img_resolution', 'img_channels', 'label_dim', 'augment_dim', 'dropout', 'use_fp16'}):
            a, b = (json.dumps(kw[key], default=str) for kw in (src_kwargs, dst_kwargs))
            if a != b:
                said.append(f'architecture: {key}={a} in {source}, {b} in this run')
        src = src.state_dict()
    if not said:
        have = {name: tuple(t.shape) for name, t in src.items()}
        want = {name: tuple(t.shape) for name, t in dst.state_dict().items()}
        bad = [name for name in want if have.get(name) != want[name] and (strict or not name.startswith('model.map_augment.'))]
        bad += [name for name in have if strict and name not in want]
        if bad:
            said.append(f'architecture: {len(bad)} tensor(s) missing or of other shapes in {source}, '
                        f'e.g. {bad[0]} {have.get(bad[0], "missing")} there, {want.get(bad[0], "missing")} in this run')
    return said

def load_for_check(path, what):
    try:
        return network_io.load_network(path, verbose=(dist.get_rank() == 0))
    except Exception as err: # a pickle can fail in any way
        fail(f'{what}: cannot load the network: {one_line(err)}')

def check_fits(src, dst, source, strict, fix, interface=None):
    said = misfit(src, dst, source, strict, interface)
    if said:
        fail(f'{source} does not fit this run: {"; ".join(said)}. {fix}')

#----------------------------------------------------------------------------

@click.command()

# Main options.
@click.option('--outdir',        help='Where to save the results  [required unless --resume]', metavar='DIR', type=str)
@click.option('--data',          help='Path to the dataset  [required unless --resume]', metavar='ZIP|DIR', type=str)
@click.option('--cond',          help='Train class-conditional model', metavar='BOOL',              type=bool, default=False, show_default=True)
@click.option('--arch',          help='Network architecture', metavar='ddpmpp|ncsnpp|adm',          type=click.Choice(['ddpmpp', 'ncsnpp', 'adm']), default='ddpmpp', show_default=True)
@click.option('--precond',       help='Preconditioning & loss function', metavar='vp|ve|edm',       type=click.Choice(['vp', 've', 'edm']), default='edm', show_default=True)
@click.option('--aot',           help='AOT pool per GPU: images paired with noise at once, 0 = plain EDM', metavar='INT', type=click.IntRange(min=0), default=512, show_default=True)
@click.option('--aot-solver',    help='Assignment solver: exact (scipy, lap), or knn for pools of thousands', metavar='scipy|lap|knn',                     type=click.Choice(aot.SOLVERS), default='scipy', show_default=True)

# Hyperparameters.
@click.option('--duration',      help='Training duration', metavar='MIMG',                          type=click.FloatRange(min=0, min_open=True), default=200, show_default=True)
@click.option('--batch',         help='Total batch size', metavar='INT',                            type=click.IntRange(min=1), default=512, show_default=True)
@click.option('--batch-gpu',     help='Limit batch size per GPU', metavar='INT',                    type=click.IntRange(min=1))
@click.option('--cbase',         help='Channel multiplier  [default: varies]', metavar='INT',       type=int)
@click.option('--cres',          help='Channels per resolution  [default: varies]', metavar='LIST', type=parse_int_list)
@click.option('--lr',            help='Learning rate', metavar='FLOAT',                             type=click.FloatRange(min=0, min_open=True), default=10e-4, show_default=True)
@click.option('--lr-rampup',     help='Learning rate ramp-up duration', metavar='KIMG',           type=click.FloatRange(min=0), default=10000, show_default=True)
@click.option('--ema',           help='EMA half-life', metavar='MIMG',                              type=click.FloatRange(min=0), default=0.5, show_default=True)
@click.option('--dropout',       help='Dropout probability', metavar='FLOAT',                       type=click.FloatRange(min=0, max=1), default=0.13, show_default=True)
@click.option('--augment',       help='Augment probability', metavar='FLOAT',                       type=click.FloatRange(min=0, max=1), default=0.12, show_default=True)
@click.option('--xflip',         help='Enable dataset x-flips', metavar='BOOL',                     type=bool, default=False, show_default=True)

# Performance-related.
@click.option('--fp16',          help='Enable mixed-precision training', metavar='BOOL',            type=bool, default=False, show_default=True)
@click.option('--ls',            help='Loss scaling (fixed, as EDM; no step is skipped)', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=1, show_default=True)
@click.option('--bench',         help='Enable cuDNN benchmarking', metavar='BOOL',                  type=bool, default=True, show_default=True)
@click.option('--cache',         help='Cache dataset in CPU memory', metavar='BOOL',                type=bool, default=True, show_default=True)
@click.option('--workers',       help='Pool worker processes; 0 = build each pool in the training process, on the training device, when it is needed; auto = on a GPU as many as keep it from waiting (0 for knn pools), 1 on the CPU', metavar='INT|auto', type=Workers(), default='auto', show_default=True)
@click.option('--tf32',          help='Allow TF32 matmuls/convolutions on CUDA (fast mode; default is EDM\'s exact fp32)', is_flag=True)
@click.option('--bf16',          help='bf16 autocast inside the U-Net (fast mode)',                 is_flag=True)
@click.option('--compile',       help='torch.compile the network for training (fast mode)',         is_flag=True)
@click.option('--deterministic', help='Deterministic algorithms only: exact resume on CUDA (slower)', is_flag=True)

# I/O-related.
@click.option('--desc',          help='String to include in result dir name', metavar='STR',        type=str)
@click.option('--nosubdir',      help='Do not create a subdirectory for results (a re-run resumes from the latest state there)', is_flag=True)
@click.option('--tick',          help='How often to print progress', metavar='KIMG',                type=click.FloatRange(min=0, min_open=True), default=50, show_default=True)
@click.option('--snap',          help='How often to save snapshots (and at the end), 0 = never', metavar='TICKS', type=click.IntRange(min=0), default=50, show_default=True)
@click.option('--dump',          help='How often to dump state (and at the end), 0 = never', metavar='TICKS', type=click.IntRange(min=0), default=500, show_default=True)
@click.option('--dump-minutes',  help='How often to replace the rolling state training-state-latest.pt, 0 = never', metavar='MIN', type=click.FloatRange(min=0), default=30, show_default=True)
@click.option('--metric-every',  help='FD of EMA samples every N ticks, 0 = never (stats.jsonl, TensorBoard)', metavar='TICKS', type=click.IntRange(min=0), default=0, show_default=True)
@click.option('--metric-images', help='EMA samples and training images of the FD metric', metavar='INT', type=click.IntRange(min=2), default=1000, show_default=True)
@click.option('--metric-detector', help='Features of the FD metric: the built-in stand-in (NOT comparable to published FID), Inception (downloaded once), or a detector pickle', metavar='standin|inception|PKL', type=str, default='standin', show_default=True)
@click.option('--grid',          help='Images in the sample grid saved with each snapshot (0 = none)', metavar='INT', type=click.IntRange(min=0), default=64, show_default=True)
@click.option('--seed',          help='Random seed  [default: random]', metavar='INT',              type=int)
@click.option('--transfer',      help='Transfer learning from network pickle', metavar='PKL|URL',   type=str)
@click.option('--resume',        help='Continue a run: its folder (newest state) or a state file; alone, it takes the run\'s recorded options', metavar='DIR|PT', type=str)
@click.option('-n', '--dry-run', help='Print training options and exit',                            is_flag=True)

def main(**kwargs):
    """Train diffusion-based generative models with AOT noise pairing.

    \b
    # AOT on CIFAR-10 (class-conditional, DDPM++), 8 GPUs
    torchrun --standalone --nproc_per_node=8 train.py --outdir=training-runs \\
        --data=datasets/cifar10-32x32.zip --cond=1 --arch=ddpmpp --aot=512

    \b
    # The bundled digits on a CPU, a few minutes
    OMP_NUM_THREADS=1 python train.py --outdir=runs --data=datasets/uci-digits-16x16.zip --cond=1 --arch=ddpmpp \\
        --cbase=16 --cres=1,2 --batch=64 --aot=256 --lr-rampup=1 --duration=0.03 --tick=5 --snap=2

    \b
    # Continue a run in its folder, with its recorded options (a longer --duration may be given)
    python train.py --resume=runs/00000-uci-digits-16x16-cond-ddpmpp-edm-gpus1-batch64-fp32

    Ctrl-C, SIGTERM and SIGUSR1 save the state (training-state-latest.pt, also written every
    --dump-minutes) after the current step on every rank and exit with status 75; torchrun then
    exits 1 (docs/training.md, "Stopping and preemption").
    """
    given = {name for name in kwargs if click.get_current_context().get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE}
    torch.multiprocessing.set_start_method('spawn', force=True)
    dist.init()

    # Continue a run with its recorded options, or start one: decided on rank 0, from the file system
    # it sees, and sent to all ranks (on several nodes the others may see another --outdir, or none).
    opts, continued_dir = on_rank0(continue_run, dnnlib.EasyDict(kwargs), given)
    command_line = {name: comparable(name, value) for name, value in opts.items() if name not in PER_INVOCATION}

    # Initialize config dict.
    c = dnnlib.EasyDict()
    c.dataset_kwargs = dnnlib.EasyDict(class_name='training.dataset.ImageFolderDataset', path=opts.data, use_labels=opts.cond, xflip=opts.xflip, cache=opts.cache)
    c.network_kwargs = dnnlib.EasyDict()
    c.loss_kwargs = dnnlib.EasyDict()
    c.optimizer_kwargs = dnnlib.EasyDict(class_name='torch.optim.Adam', lr=opts.lr, betas=[0.9,0.999], eps=1e-8)

    # Validate dataset options.
    try:
        dataset_obj = dnnlib.util.construct_class_by_name(**c.dataset_kwargs)
        dataset_name = dataset_obj.name
        c.dataset_kwargs.resolution = dataset_obj.resolution # be explicit about dataset resolution
        c.dataset_kwargs.max_size = len(dataset_obj) # be explicit about dataset size
        if opts.cond and not dataset_obj.has_labels:
            fail(f'--cond=1 requires labels, but {opts.data} has no dataset.json with labels; add one or use --cond=0')
        res = dataset_obj.resolution
        if res < 4 or res & (res - 1):
            fail(f'Dataset resolution {res} is not a power of two; convert with dataset_tool.py --resolution')
        if opts.aot > len(dataset_obj):
            dist.print0(f'Warning: --aot={opts.aot} is larger than the dataset ({len(dataset_obj)} images): every pool '
                        f'holds some images more than once. Use --aot={len(dataset_obj)} or less for distinct images in a pool.')
        interface_kwargs = dict(img_resolution=res, img_channels=dataset_obj.num_channels, label_dim=dataset_obj.label_dim)
        del dataset_obj # conserve memory
    except click.ClickException:
        raise
    except (IOError, OSError, ValueError) as err:
        fail(f'Cannot use dataset --data={opts.data}: {err}')

    # Pool placement: worker processes, as many as keep the GPU from waiting, one on the CPU; knn
    # pools in the training process, on the GPU (training/pools.py, auto_workers).
    if opts.workers == 'auto':
        cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
        opts.workers = pools.auto_workers(opts.aot, interface_kwargs['label_dim'], cores // dist.get_local_world_size(), dist.use_cuda(), opts.aot_solver)
    c.data_loader_kwargs = dnnlib.EasyDict(pin_memory=dist.use_cuda(), num_workers=opts.workers)
    if opts.workers > 0:
        c.data_loader_kwargs.update(prefetch_factor=1, persistent_workers=True) # each worker builds one pool ahead: enough overlap, no waste

    # Network architecture.
    if opts.arch == 'ddpmpp':
        c.network_kwargs.update(model_type='SongUNet', embedding_type='positional', encoder_type='standard', decoder_type='standard')
        c.network_kwargs.update(channel_mult_noise=1, resample_filter=[1,1], model_channels=128, channel_mult=[2,2,2])
    elif opts.arch == 'ncsnpp':
        c.network_kwargs.update(model_type='SongUNet', embedding_type='fourier', encoder_type='residual', decoder_type='standard')
        c.network_kwargs.update(channel_mult_noise=2, resample_filter=[1,3,3,1], model_channels=128, channel_mult=[2,2,2])
    else:
        c.network_kwargs.update(model_type='DhariwalUNet', model_channels=192, channel_mult=[1,2,3,4])

    # Preconditioning & loss function: every one of them takes the AOT-paired noise.
    if opts.precond == 'vp':
        c.network_kwargs.class_name = 'training.networks.VPPrecond'
        c.loss_kwargs.class_name = 'training.loss.VPLoss'
    elif opts.precond == 've':
        c.network_kwargs.class_name = 'training.networks.VEPrecond'
        c.loss_kwargs.class_name = 'training.loss.VELoss'
    else:
        c.network_kwargs.class_name = 'training.networks.EDMPrecond'
        c.loss_kwargs.class_name = 'training.loss.EDMLoss'

    # Network options.
    if opts.cbase is not None:
        c.network_kwargs.model_channels = opts.cbase
    if opts.cres is not None:
        c.network_kwargs.channel_mult = opts.cres
    if opts.augment:
        c.augment_kwargs = dnnlib.EasyDict(class_name='training.augment.AugmentPipe', p=opts.augment)
        c.augment_kwargs.update(xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)
        c.network_kwargs.augment_dim = 9
    c.network_kwargs.update(dropout=opts.dropout, use_fp16=opts.fp16)

    # Training options.
    c.total_kimg = opts.duration * 1000 # fractional kimg allowed: short CPU runs
    c.ema_halflife_kimg = int(opts.ema * 1000)
    c.lr_rampup_kimg = opts.lr_rampup
    c.update(batch_size=opts.batch, batch_gpu=opts.batch_gpu)
    c.update(loss_scaling=opts.ls, cudnn_benchmark=opts.bench)
    c.update(tf32=opts.tf32, bf16=opts.bf16, compile=opts.compile, deterministic=opts.deterministic)
    if opts.bf16 and opts.fp16:
        fail('--bf16 and --fp16=1 are two kinds of mixed precision; choose one')
    c.update(kimg_per_tick=opts.tick, snapshot_ticks=opts.snap or None, state_dump_ticks=opts.dump or None, state_dump_minutes=opts.dump_minutes or None)
    c.update(aot_pool=opts.aot, aot_solver=opts.aot_solver, grid_images=opts.grid)
    c.update(metric_every=opts.metric_every, metric_images=opts.metric_images, metric_detector=opts.metric_detector)

    # Batch and pool sizes: refuse what EDM-AOT silently got wrong (dropped or empty slices).
    world = dist.get_world_size()
    if opts.batch % world:
        fail(f'--batch={opts.batch} is not divisible by the number of GPUs ({world}); use a multiple of {world}')
    batch_gpu = min(opts.batch_gpu or opts.batch // world, opts.batch // world)
    if (opts.batch // world) % batch_gpu:
        fail(f'--batch={opts.batch} over {world} GPU(s) is {opts.batch // world} per GPU, not a multiple of --batch-gpu={batch_gpu}')
    c.batch_gpu = batch_gpu # the loop takes it as checked here
    if opts.aot and opts.aot % batch_gpu:
        fail(f'--aot={opts.aot} is not a multiple of the per-GPU batch {batch_gpu}; use e.g. --aot={max(opts.aot // batch_gpu, 1) * batch_gpu}')
    try:
        aot.check_solver(opts.aot_solver)
    except ValueError as err:
        fail(f'--aot-solver={opts.aot_solver}: {err}')
    if opts.aot_solver in aot.DENSE_SOLVERS and not interface_kwargs['label_dim'] and opts.aot > MAX_EXACT_POOL:
        fail(f'--aot-solver={opts.aot_solver} would solve exact assignments of {opts.aot} noises: minutes per pool and '
             f'{opts.aot ** 2 * 8 / 2**30:.0f} GiB; use --aot-solver=knn (within 1% of exact, docs/aot-scale.md) or at most {MAX_EXACT_POOL}')

    # Random seed.
    c.seed = opts.seed if opts.seed is not None else int(torch.randint(1 << 31, size=[]))

    # Transfer learning and resume. A resumed transfer run keeps the EMA without ramp-up.
    if opts.transfer is not None:
        c.ema_rampup_ratio = None
    if opts.transfer is not None and opts.resume is None:
        if not dnnlib.util.is_url(opts.transfer) and not os.path.isfile(opts.transfer):
            fail(f'--transfer={opts.transfer}: no such file')
        c.resume_pkl = opts.transfer
        # Checked here, before the run directory exists: the loop would load whatever names match.
        src, dst = load_for_check(opts.transfer, f'--transfer={opts.transfer}'), planned_network(c, interface_kwargs)
        check_fits(src, dst, f'--transfer={opts.transfer}', strict=False, fix='Transfer from a snapshot of data with the same '
                   'resolution and classes, trained with the same --arch, --cbase, --cres and --precond.')
        if {name for name in dst.state_dict() if name.startswith('model.map_augment.')} - set(src.state_dict()):
            dist.print0('Note: the snapshot has no augmentation-label layer; this run starts that layer from random weights.')
        del src, dst
    elif opts.resume is not None:
        match = re.fullmatch(r'training-state-(\d+|latest)\.pt', os.path.basename(opts.resume))
        if not match or not os.path.isfile(opts.resume):
            fail(f'--resume={opts.resume}: expected an existing training-state-NNNNNN.pt or -latest.pt file or a run directory')
        try:
            state = training_loop.load_training_state(opts.resume)
        except Exception as err: # torch raises many types for a damaged file
            fail(f'--resume={opts.resume}: cannot read training state ({type(err).__name__}); the file is damaged or not a training state')
        if not isinstance(state, dict) or not {'net', 'optimizer_state'} <= state.keys():
            fail(f'--resume={opts.resume}: not a training state (it holds no network and optimizer state)')
        fix = 'Resume with the options of the interrupted run (its training_options.json lists them).'
        dst = planned_network(c, interface_kwargs)
        if state.get('format') == training_loop.STATE_FORMAT:
            # The pools (images, noise, pairings) and their order follow from these: refuse a change.
            for flag, key, value in [('--batch', 'batch_size', opts.batch), ('--aot', 'aot_pool', opts.aot), ('--seed', 'seed', opts.seed)]:
                if value is not None and key in state and state[key] != value:
                    fail(f'--resume={opts.resume}: the interrupted run had {flag}={state[key]}, this one {flag}={value}; the pools '
                         f'follow from it. Resume with {flag}={state[key]}, or start a new run from its weights with --transfer=<network-snapshot>.')
            if state.get('world_size', world) != world:
                dist.print0(f'Note: the interrupted run had {state["world_size"]} GPU(s), this one {world}: pools are rebuilt for {world} '
                            f'rank(s) from image {state["cur_nimg"]} on, so training continues but not as the uninterrupted run would have.')
            check_fits(state['net'], dst, f'--resume={opts.resume}', strict=True, fix=fix, interface=state_interface(state))
            if opts.seed is None:
                c.seed = state['seed'] # the pools and the random streams continue as before
        elif match.group(1) == 'latest':
            fail(f'--resume={opts.resume}: not a training state of this train.py (format {state.get("format")!r})')
        else: # EDM's state dump: the EMA weights live in the snapshot pickle next to it
            c.resume_pkl = os.path.join(os.path.dirname(opts.resume), f'network-snapshot-{match.group(1)}.pkl')
            if not os.path.isfile(c.resume_pkl):
                fail(f'--resume={opts.resume}: EDM state dumps need {c.resume_pkl} next to them')
            c.resume_kimg = int(match.group(1))
            check_fits(state['net'], dst, f'--resume={opts.resume}', strict=True, fix=fix)
            check_fits(load_for_check(c.resume_pkl, c.resume_pkl), dst, c.resume_pkl, strict=True, fix=fix)
        del dst
        c.resume_state_dump = opts.resume
        del state
    c.seed = dist.broadcast_object(c.seed)
    command_line['seed'] = c.seed # a re-run draws the same pools

    # Description string.
    cond_str = 'cond' if c.dataset_kwargs.use_labels else 'uncond'
    dtype_str = 'fp16' if c.network_kwargs.use_fp16 else 'bf16' if opts.bf16 else 'fp32'
    desc = f'{dataset_name:s}-{cond_str:s}-{opts.arch:s}-{opts.precond:s}-gpus{world:d}-batch{c.batch_size:d}-{dtype_str:s}'
    if opts.desc is not None:
        desc += f'-{opts.desc}'

    # Pick output directory.
    if dist.get_rank() != 0:
        c.run_dir = None
    elif continued_dir is not None:
        c.run_dir = continued_dir
    elif opts.nosubdir:
        c.run_dir = opts.outdir
    else:
        prev_run_dirs = []
        if os.path.isdir(opts.outdir):
            prev_run_dirs = [x for x in os.listdir(opts.outdir) if os.path.isdir(os.path.join(opts.outdir, x))]
        prev_run_ids = [re.match(r'^\d+', x) for x in prev_run_dirs]
        prev_run_ids = [int(x.group()) for x in prev_run_ids if x is not None]
        cur_run_id = max(prev_run_ids, default=-1) + 1
        c.run_dir = os.path.join(opts.outdir, f'{cur_run_id:05d}-{desc}')
        assert not os.path.exists(c.run_dir)

    # Print options.
    dist.print0()
    dist.print0('Training options:')
    dist.print0(json.dumps(c, indent=2))
    dist.print0()
    dist.print0(f'Output directory:        {c.run_dir}')
    dist.print0(f'Dataset path:            {c.dataset_kwargs.path}')
    dist.print0(f'Class-conditional:       {c.dataset_kwargs.use_labels}')
    dist.print0(f'Network architecture:    {opts.arch}')
    dist.print0(f'Preconditioning & loss:  {opts.precond}')
    dist.print0(f'AOT pool per GPU:        {opts.aot or "off"}')
    dist.print0(f'Number of GPUs:          {world}')
    dist.print0(f'Batch size:              {c.batch_size}')
    dist.print0(f'Mixed-precision:         {c.network_kwargs.use_fp16}')
    fast = ', '.join(k for k in ['tf32', 'bf16', 'compile'] if opts[k]) or "off (EDM's fp32)"
    dist.print0(f'Fast numerics:           {fast}')
    dist.print0()

    # Dry run?
    if opts.dry_run:
        dist.print0('Dry run; exiting.')
        return

    # Create output directory.
    dist.print0('Creating output directory...')
    if dist.get_rank() == 0:
        os.makedirs(c.run_dir, exist_ok=True)
        with dnnlib.util.atomic_write(os.path.join(c.run_dir, 'training_options.json')) as tmp, open(tmp, 'wt') as f:
            json.dump(dict(c, command_line=command_line), f, indent=2) # the loop's arguments, and what --resume=RUN_DIR needs
        dnnlib.util.Logger(file_name=os.path.join(c.run_dir, 'log.txt'), file_mode='a', should_flush=True)

    # Train.
    try:
        training_loop.training_loop(**c)
    except training_loop.Interrupted as stop:
        dist.print0(f'{stop}. Exit status {EXIT_INTERRUPTED}. To continue: train.py --resume={c.run_dir}')
        sys.exit(EXIT_INTERRUPTED)
    except DamagedImageError as err: # found only when a pool decodes the image
        fail(str(err))
    except FIDError as err: # the FD metric's detector cannot be had, or does not fit the images
        fail(f'--metric-detector={opts.metric_detector}: {err}')

#----------------------------------------------------------------------------

if __name__ == "__main__":
    main()

#----------------------------------------------------------------------------
