"""Train diffusion-based generative models with Approximated Optimal Transport (AOT):
EDM's training with the noise of each image chosen by an optimal assignment within a pool."""

import json
import os
import sys

import click
import torch

import dnnlib
from metrics.fid import FIDError
from torch_utils import distributed as dist
from training import aot, config, run_dir, training_loop
from training.dataset import DamagedImageError
from training.errors import Opt, OptionError

# Exit status after a stop signal (SIGINT, SIGTERM, SIGUSR1) once the state is saved: EX_TEMPFAIL of
# sysexits.h, "try again later". torchrun exits 1 instead (docs/training.md, "Preemption").
EXIT_INTERRUPTED = 75

#----------------------------------------------------------------------------

class Workers(click.ParamType):
    """--workers: a count, or 'auto' (resolved once the device is known)."""
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

def fail(msg):
    raise click.ClickException(msg)

def flag(option, value=Opt.NONE):
    """How this program names an option of the library's messages: '--batch-gpu', '--resume=DIR'."""
    name = '--' + option.replace('_', '-')
    return name if value is Opt.NONE else f'{name}={value}'

def on_rank0(fn, *args):
    """fn(*args) evaluated on rank 0 and sent to every rank; an error there stops all ranks alike."""
    result = None
    if dist.get_rank() == 0:
        try:
            result = ('ok', checked(fn, *args))
        except click.ClickException as err:
            result = ('error', err.message)
    result = dist.broadcast_object(result)
    if result[0] == 'error':
        fail(result[1])
    return result[1]

def decide_resume(opts):
    """The state file to resume from (None = start afresh), as rank 0 sees the file system."""
    in_place = opts.nosubdir and opts.resume is None and opts.transfer is None
    state = run_dir.find_state(opts.resume, opts.outdir, in_place)
    if in_place and state is not None:
        print(f'Found {state}: resuming from it (pass a new --outdir to start afresh).')
    return state

def continue_run(opts, given):
    """On rank 0: the options of this invocation and the folder to continue in (None = a new one)."""
    if 'transfer' in given and opts.resume is not None:
        fail('--transfer and --resume cannot be specified at the same time')
    return run_dir.continue_options(opts, given, decide_resume(opts))

def checked(fn, *args, **kwargs):
    """fn(...) with the library's refusals of options as this program's errors, naming flags."""
    try:
        return fn(*args, **kwargs)
    except OptionError as err:
        fail(err.message(flag))

#----------------------------------------------------------------------------

def print_options(c, opts):
    dist.print0()
    dist.print0('Training options:')
    dist.print0(json.dumps(c, indent=2))
    dist.print0()
    fast = ', '.join(k for k in ['tf32', 'bf16', 'compile'] if opts[k]) or "off (EDM's fp32)"
    for what, value in [('Output directory', c.run_dir), ('Dataset path', c.dataset_kwargs.path),
                        ('Class-conditional', c.dataset_kwargs.use_labels), ('Network architecture', opts.arch),
                        ('Preconditioning & loss', opts.precond), ('AOT pool per GPU', opts.aot or 'off'),
                        ('Number of GPUs', dist.get_world_size()), ('Batch size', c.batch_size),
                        ('Mixed-precision', c.network_kwargs.use_fp16), ('Fast numerics', fast)]:
        dist.print0(f'{what + ":":<25}{value}')
    dist.print0()

def launch(c, command_line):
    """Create the run folder (rank 0), record the options, log, and train."""
    dist.print0('Creating output directory...')
    if dist.get_rank() == 0:
        os.makedirs(c.run_dir, exist_ok=True)
        run_dir.write_options(c.run_dir, c, command_line)
        dnnlib.util.Logger(file_name=os.path.join(c.run_dir, 'log.txt'), file_mode='a', should_flush=True)
    try:
        training_loop.training_loop(**c)
    except training_loop.Interrupted as stop:
        dist.print0(f'{stop}. Exit status {EXIT_INTERRUPTED}. To continue: train.py --resume={c.run_dir}')
        sys.exit(EXIT_INTERRUPTED)
    except DamagedImageError as err: # an image changed on disk after config.probe_dataset checked it
        fail(str(err))
    except FIDError as err: # the FD metric's detector cannot be had, or does not fit the images
        fail(f'--metric-detector={c.metric_detector}: {err}')

#----------------------------------------------------------------------------

@click.command()

# Main options.
@click.option('--outdir',        help='Where to save the results  [required unless --resume]', metavar='DIR', type=str)
@click.option('--data',          help='Path to the dataset  [required unless --resume]', metavar='ZIP|DIR', type=str)
@click.option('--cond',          help='Train class-conditional model', metavar='BOOL', type=bool,
              default=False, show_default=True)
@click.option('--arch',          help='Network architecture', metavar='ddpmpp|ncsnpp|adm',
              type=click.Choice(['ddpmpp', 'ncsnpp', 'adm']), default='ddpmpp', show_default=True)
@click.option('--precond',       help='Preconditioning & loss function', metavar='vp|ve|edm',
              type=click.Choice(['vp', 've', 'edm']), default='edm', show_default=True)
@click.option('--aot',           help='AOT pool per GPU: images paired with noise at once, 0 = plain EDM',
              metavar='INT', type=click.IntRange(min=0), default=512, show_default=True)
@click.option('--nearest-of',    help='Nearest of K fresh noises per image instead of AOT (K >= 2; --aot then defaults to 0)',
              metavar='K', type=click.IntRange(min=0), default=0, show_default=True)
@click.option('--aot-solver',    help='Assignment solver: exact (scipy, lap), or knn for pools of thousands',
              metavar='scipy|lap|knn', type=click.Choice(aot.SOLVERS), default='scipy',
              show_default=True)

# Hyperparameters.
@click.option('--duration',      help='Training duration', metavar='MIMG',
              type=click.FloatRange(min=0, min_open=True), default=200, show_default=True)
@click.option('--batch',         help='Total batch size', metavar='INT',
              type=click.IntRange(min=1), default=512, show_default=True)
@click.option('--batch-gpu',     help='Limit batch size per GPU', metavar='INT',
              type=click.IntRange(min=1))
@click.option('--cbase',         help='Channel multiplier  [default: varies]', metavar='INT',       type=int)
@click.option('--cres',          help='Channels per resolution  [default: varies]', metavar='LIST', type=dnnlib.util.parse_int_list)
@click.option('--lr',            help='Learning rate', metavar='FLOAT',
              type=click.FloatRange(min=0, min_open=True), default=10e-4, show_default=True)
@click.option('--lr-rampup',     help='Learning rate ramp-up duration', metavar='KIMG',
              type=click.FloatRange(min=0), default=10000, show_default=True)
@click.option('--ema',           help='EMA half-life', metavar='MIMG',
              type=click.FloatRange(min=0), default=0.5, show_default=True)
@click.option('--dropout',       help='Dropout probability', metavar='FLOAT',
              type=click.FloatRange(min=0, max=1), default=0.13, show_default=True)
@click.option('--augment',       help='Augment probability', metavar='FLOAT',
              type=click.FloatRange(min=0, max=1), default=0.12, show_default=True)
@click.option('--xflip',         help='Enable dataset x-flips', metavar='BOOL', type=bool,
              default=False, show_default=True)

# Performance-related.
@click.option('--fp16',          help='Enable mixed-precision training', metavar='BOOL', type=bool,
              default=False, show_default=True)
@click.option('--ls',            help='Loss scaling (fixed, as EDM; no step is skipped)', metavar='FLOAT',
              type=click.FloatRange(min=0, min_open=True), default=1, show_default=True)
@click.option('--bench',         help='Enable cuDNN benchmarking', metavar='BOOL', type=bool,
              default=True, show_default=True)
@click.option('--cache',         help='Cache dataset in CPU memory', metavar='BOOL', type=bool,
              default=True, show_default=True)
@click.option('--workers',
              help='Pool worker processes; 0 = build each pool in the training process, on the training device, when it '
                   'is needed; auto = on a GPU as many as keep it from waiting (0 for knn pools), 1 on the CPU',
              metavar='INT|auto', type=Workers(), default='auto', show_default=True)
@click.option('--tf32',
              help='Allow TF32 matmuls/convolutions on CUDA (fast mode; default is EDM\'s exact fp32)', is_flag=True)
@click.option('--bf16',          help='bf16 autocast inside the U-Net (fast mode)',                 is_flag=True)
@click.option('--compile',       help='torch.compile the network for training (fast mode)',         is_flag=True)
@click.option('--deterministic', help='Deterministic algorithms only: exact resume on CUDA (slower)', is_flag=True)

# I/O-related.
@click.option('--desc',          help='String to include in result dir name', metavar='STR',        type=str)
@click.option('--nosubdir',
              help='Do not create a subdirectory for results (a re-run resumes from the latest state there)',
              is_flag=True)
@click.option('--tick',          help='How often to print progress', metavar='KIMG',
              type=click.FloatRange(min=0, min_open=True), default=50, show_default=True)
@click.option('--snap',          help='How often to save snapshots (and at the end), 0 = never', metavar='TICKS',
              type=click.IntRange(min=0), default=50, show_default=True)
@click.option('--dump',          help='How often to dump state (and at the end), 0 = never', metavar='TICKS',
              type=click.IntRange(min=0), default=500, show_default=True)
@click.option('--dump-minutes',  help='How often to replace the rolling state training-state-latest.pt, 0 = never',
              metavar='MIN', type=click.FloatRange(min=0), default=30, show_default=True)
@click.option('--metric-every',  help='FD of EMA samples every N ticks, 0 = never (stats.jsonl, TensorBoard)',
              metavar='TICKS', type=click.IntRange(min=0), default=0, show_default=True)
@click.option('--metric-images', help='EMA samples and training images of the FD metric', metavar='INT',
              type=click.IntRange(min=2), default=1000, show_default=True)
@click.option('--metric-detector',
              help='Features of the FD metric: the built-in stand-in (NOT comparable to published FID), Inception '
                   '(downloaded once), or a detector pickle',
              metavar='standin|inception|PKL', type=str, default='standin', show_default=True)
@click.option('--grid',          help='Images in the sample grid saved with each snapshot (0 = none)', metavar='INT',
              type=click.IntRange(min=0), default=64, show_default=True)
@click.option('--seed',          help='Random seed  [default: random]', metavar='INT',              type=int)
@click.option('--transfer',      help='Transfer learning from network pickle', metavar='PKL|URL',   type=str)
@click.option('--resume',
              help='Continue a run: its folder (newest state) or a state file; alone, it takes the run\'s recorded options',
              metavar='DIR|PT', type=str)
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
    source = click.get_current_context().get_parameter_source
    given = {name for name in kwargs if source(name) == click.core.ParameterSource.COMMANDLINE}
    if kwargs['nearest_of'] and 'aot' not in given:
        kwargs['aot'] = 0 # --aot's default pool is AOT's coupling; --nearest-of is another
    torch.multiprocessing.set_start_method('spawn', force=True)
    dist.init()

    # Continue a run with its recorded options, or start one: decided on rank 0, from the file system
    # it sees, and sent to all ranks (on several nodes the others may see another --outdir, or none).
    opts, continued_dir = on_rank0(continue_run, dnnlib.EasyDict(kwargs), given)
    command_line = run_dir.options_record(opts)
    c, desc = checked(config.training_config, opts, dist.get_world_size(), name=flag)
    command_line['seed'] = c.seed # a re-run draws the same pools
    if dist.get_rank() != 0:
        c.run_dir = None
    elif continued_dir is not None:
        c.run_dir = continued_dir
    else:
        c.run_dir = opts.outdir if opts.nosubdir else run_dir.next_run_dir(opts.outdir, desc)
    print_options(c, opts)
    if opts.dry_run:
        dist.print0('Dry run; exiting.')
        return
    launch(c, command_line)

#----------------------------------------------------------------------------

if __name__ == "__main__":
    main()

#----------------------------------------------------------------------------
