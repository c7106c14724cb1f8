"""generate.py: images from a trained network with EDM's samplers, the few-step solvers,
Discriminator Guidance and OT-start (the sampling/ package), a thin shell over it: flags become
library calls here, and library errors become messages that name the flags.

One PNG per seed; a seed gives the same image whatever the batch size or number of processes,
and the same image as EDM's generate.py for the same network and options."""

import itertools
import os
import shlex
import signal
import sys
import click
import numpy as np
import PIL.Image
import torch
import tqdm
from dnnlib.util import one_line
from torch_utils import distributed as dist
from sampling import generate as library, ot_start, schedules, solvers
from sampling.generate import FEW_STEP, png_name
from sampling.guidance import DiscriminatorGuidance
from sampling.image_folder import RECORD, ImageFolder, file_setting, jsonable
from sampling.images import save_image_grid
from sampling.seeds import parse_seeds
from training import guidance
from training.errors import Opt, OptionError
from training.network_io import load_network

GRID_MAX_IMAGES = 256 # --grid shows the first images in seed order; a 50k-image grid helps nobody

#----------------------------------------------------------------------------

class SeedList(click.ParamType):
    name = 'list'
    def convert(self, value, param, ctx):
        if isinstance(value, list):
            return value
        try:
            return parse_seeds(value)
        except ValueError as e:
            self.fail(f'{e} (example: --seeds=0-49999 or --seeds=1,2,5-10)', param, ctx)

def fail_together(error):
    """Make every rank stop if any rank hit an error (else the others would wait at a barrier forever).
    Rank 0 reports the first error as a one-line message; the other ranks exit quietly."""
    errors = [None] * dist.get_world_size()
    torch.distributed.all_gather_object(errors, error)
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        if dist.get_rank() == 0:
            raise click.ClickException(first)
        raise SystemExit(1)

def flag(option, value=Opt.NONE):
    """How this program names an option of the library's messages: s_noise is EDM's --S_noise."""
    name = '--S_noise' if option == 's_noise' else f'--{option}'
    return name if value is Opt.NONE else f'{name}={value}'

# The few-step solvers' options (sampling/solvers.py, docs/few-step.md); euler and heun stay EDM's ablation solvers.
FEW_STEP_OPTIONS = {'order': '--order', 'variant': '--unipc-variant', 'afs': '--afs', 'sigmas': '--sigmas', 'eta': '--eta'}
STOCHASTIC = list(solvers.STOCHASTIC) # k-diffusion's stochastic few-step samplers: --eta, and --S_noise as their noise scale

def check_few_step_options(sampler_kwargs):
    """Raise click.BadParameter for few-step options without a few-step --solver, or EDM's sampler options with one."""
    few_step = sampler_kwargs.get('solver') in FEW_STEP
    given = [option for key, option in FEW_STEP_OPTIONS.items() if key in sampler_kwargs]
    if given and not few_step:
        raise click.BadParameter(f'works with the few-step solvers: add --solver={"|".join(FEW_STEP)}', param_hint=given[0])
    if not few_step:
        return
    stochastic = sampler_kwargs['solver'] in STOCHASTIC
    try:
        solvers.check_noise(sampler_kwargs['solver'], sampler_kwargs.get('eta'), sampler_kwargs.get('S_noise'))
    except OptionError as err:
        raise click.UsageError(err.message(flag))
    edm_only = [option for key, option in [('schedule', '--schedule'), ('scaling', '--scaling')] if key in sampler_kwargs]
    edm_only += ['--S_churn'] if sampler_kwargs.get('S_churn', 0) > 0 else []
    if edm_only:
        noise = f'; its noise is --eta and --S_noise' if stochastic else f' (the stochastic ones: {"|".join(STOCHASTIC)})'
        raise click.BadParameter(f'is an option of EDM\'s samplers; --solver={sampler_kwargs["solver"]} takes --disc={"|".join(schedules.DISCRETIZATIONS)}{noise}', param_hint=edm_only[0])
    if sampler_kwargs.get('discretization', 'edm') not in schedules.DISCRETIZATIONS:
        raise click.BadParameter(f'{sampler_kwargs["discretization"]} is an ablation discretization; --solver={sampler_kwargs["solver"]} takes {"|".join(schedules.DISCRETIZATIONS)}', param_hint='--disc')
    replaced = [option for key, option in [('discretization', '--disc'), ('sigma_min', '--sigma_min'), ('sigma_max', '--sigma_max')] if key in sampler_kwargs]
    if 'sigmas' in sampler_kwargs and replaced:
        raise click.BadParameter('gives the noise levels; drop ' + ', '.join(replaced), param_hint='--sigmas')

def check_dg_options(dg_path, dg_classifier, dg_head, dg_kwargs, sampler_kwargs):
    """Raise click.BadParameter for Discriminator Guidance options that do not go together."""
    if dg_path and (dg_classifier or dg_head):
        raise click.BadParameter('give either --dg or DG\'s published pair --dg-classifier/--dg-head, not both', param_hint='--dg')
    if bool(dg_classifier) != bool(dg_head):
        raise click.BadParameter('DG\'s published discriminator needs both --dg-classifier and --dg-head', param_hint='--dg-head' if dg_classifier else '--dg-classifier')
    if dg_kwargs and not (dg_path or dg_classifier):
        option = '--' + next(iter(dg_kwargs)).replace('_', '-')
        raise click.BadParameter('needs a discriminator: add --dg=FILE (or --dg-classifier and --dg-head)', param_hint=option)
    if (dg_path or dg_classifier) and sampler_kwargs.get('solver') in FEW_STEP:
        heun_only = [key for key in ('dg_weight_2nd', 'dg_boosting') if key in dg_kwargs]
        if heun_only:
            raise click.BadParameter(f'is DG\'s for EDM\'s Heun sampler; with --solver={sampler_kwargs["solver"]} DG corrects every evaluation by --dg-weight', param_hint='--' + heun_only[0].replace('_', '-'))
    elif (dg_path or dg_classifier) and any(x in sampler_kwargs for x in ['solver', 'discretization', 'schedule', 'scaling']):
        raise click.BadParameter('Discriminator Guidance works with EDM\'s sampler and the few-step solvers; drop --disc/--schedule/--scaling or use --solver=' + '|'.join(FEW_STEP), param_hint='--dg')
    if dg_kwargs.get('dg_time_min', 0.01) > dg_kwargs.get('dg_time_max', 1.0):
        raise click.BadParameter(f'--dg-time-min {dg_kwargs["dg_time_min"]} must not exceed --dg-time-max {dg_kwargs.get("dg_time_max", 1.0)}', param_hint='--dg-time-min')

def check_ot_map_options(sampler_kwargs, class_idx):
    """ValueError for options that --ot-map replaces or that do not go with it."""
    ablation = [key for key in ('solver', 'discretization', 'schedule', 'scaling') if key in sampler_kwargs]
    if ablation:
        raise ValueError(f'OT-start runs Heun (edm_sampler); drop --{", --".join(ablation)}'.replace('discretization', 'disc'))
    if 'sigma_max' in sampler_kwargs:
        raise ValueError('the OT map sets the starting noise level (sigma_T); drop --sigma_max')
    if class_idx is not None:
        raise ValueError('the class of each image is its target\'s; --class cannot be combined with --ot-map')

#----------------------------------------------------------------------------
# Stopping and continuing.

class StopRequest:
    """SIGINT (Ctrl-C; torchrun passes it on to its workers) and SIGTERM (schedulers, kill) ask the
    loop to stop after the current batch, so that its PNGs and dataset.json are written. A second
    Ctrl-C stops at once, as in train.py: PNGs are complete or absent even then, and the next run
    lists any that dataset.json misses."""

    def __init__(self):
        self.signal = None
        self.previous = {s: signal.signal(s, self._handle) for s in [signal.SIGINT, signal.SIGTERM]}

    def _handle(self, signum, _frame):
        if self.signal == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        first, self.signal = self.signal is None, self.signal or signum # before the print: a signal can arrive during it
        if first and dist.get_rank() == 0:
            print(f'\n{signal.Signals(signum).name}: stopping after this batch (Ctrl-C again stops at once)...', file=sys.stderr, flush=True)

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

def continue_command():
    """The command line that continues this run (without --force, which would start over)."""
    args = [sys.argv[0]] + [a for a in sys.argv[1:] if a != '--force']
    if 'LOCAL_WORLD_SIZE' not in os.environ:
        return shlex.join(['python'] + args)
    if dist.get_world_size() == dist.get_local_world_size():
        return shlex.join(['torchrun', '--standalone', f'--nproc_per_node={dist.get_local_world_size()}'] + args)
    return f'your torchrun command on every node, running {shlex.join(args)}'

#----------------------------------------------------------------------------

@click.command()
@click.option('--network', 'network_pkl',  help='Snapshot pickle, .safetensors file, train.py run folder (its newest snapshot), or URL', metavar='PATH|DIR|URL', type=str, required=True)
@click.option('--outdir',                  help='Output folder for the PNGs; a run into a folder that has some of them continues', metavar='DIR', type=str, required=True)
@click.option('--seeds',                   help='Seeds and ranges, e.g. 0-49999 or 1,2,5-10 (each below 2^32)', metavar='LIST', type=SeedList(), default='0-63', show_default=True)
@click.option('--subdirs',                 help='One folder per 1000 seeds',                                        is_flag=True)
@click.option('--force',                   help='Generate again the seeds whose PNG is already in --outdir',         is_flag=True)
@click.option('--class', 'class_idx',      help='Class of every image, its label (log.txt of a run names them)  [default: random per seed]', metavar='INT',  type=click.IntRange(min=0), default=None)
@click.option('--batch', 'max_batch_size', help='Images per network call and process, at most', metavar='INT',     type=click.IntRange(min=1), default=64, show_default=True)
@click.option('--grid',                    help=f'Also write a grid of the first {GRID_MAX_IMAGES} images', metavar='PATH', type=str, default=None)
@click.option('--device',                  help='Torch device  [default: cuda if available, else cpu]', metavar='STR', type=str, default=None)
@click.option('--ot-map', 'ot_map_path',   help='OT-start: begin at the sigma_T target each latent picks (tools/ot_map.py, docs/ot-start.md)', metavar='FILE', type=str, default=None)

@click.option('--steps', 'num_steps',      help='Noise levels N (Heun: 2N-1 network calls)', metavar='INT',          type=click.IntRange(min=2), default=18, show_default=True)
@click.option('--sigma_min',               help='Smallest noise level  [default: per sampler]', metavar='FLOAT',    type=click.FloatRange(min=0, min_open=True))
@click.option('--sigma_max',               help='Largest noise level  [default: per sampler]', metavar='FLOAT',     type=click.FloatRange(min=0, min_open=True))
@click.option('--rho',                     help='Exponent of the noise level spacing', metavar='FLOAT',             type=click.FloatRange(min=0, min_open=True), default=7, show_default=True)
@click.option('--S_churn', 'S_churn',      help='Amount of added noise (0: deterministic)', metavar='FLOAT',       type=click.FloatRange(min=0), default=0, show_default=True)
@click.option('--S_min', 'S_min',          help='Add noise only above this level', metavar='FLOAT',                 type=click.FloatRange(min=0), default=0, show_default=True)
@click.option('--S_max', 'S_max',          help='Add noise only below this level', metavar='FLOAT',                 type=click.FloatRange(min=0), default='inf', show_default=True)
@click.option('--S_noise', 'S_noise',      help='Scale of the added noise (EDM\'s churn; euler_ancestral, dpmpp_2m_sde)', metavar='FLOAT', type=float, default=1, show_default=True)

@click.option('--solver',                  help='ODE solver: EDM\'s ablation euler|heun, a few-step solver, or k-diffusion\'s stochastic euler_ancestral|dpmpp_2m_sde (docs/few-step.md)', metavar='euler|heun|' + '|'.join(FEW_STEP), type=click.Choice(['euler', 'heun', *FEW_STEP]))
@click.option('--disc', 'discretization',  help='Time step discretization: ablation vp|ve|iddpm|edm; few-step edm|logsnr|time-uniform', metavar='NAME', type=click.Choice(['vp', 've', 'iddpm', 'edm', 'logsnr', 'time-uniform']))
@click.option('--schedule',                help='Ablation: noise schedule sigma(t)', metavar='vp|ve|linear',        type=click.Choice(['vp', 've', 'linear']))
@click.option('--scaling',                 help='Ablation: signal scaling s(t)', metavar='vp|none',                 type=click.Choice(['vp', 'none']))
@click.option('--order',                   help='Few-step: max order  [default: ipndm, ipndm-v 4; dpmpp, unipc, deis 3]', metavar='INT', type=int)
@click.option('--unipc-variant', 'variant', help='Few-step: UniPC\'s B(h)  [default: bh2]', metavar='bh1|bh2',    type=click.Choice(['bh1', 'bh2']))
@click.option('--eta',                     help='euler_ancestral, dpmpp_2m_sde: fresh noise per step, 0 = their ODE  [default: 1]', metavar='FLOAT', type=click.FloatRange(min=0))
@click.option('--afs',                     help='Few-step: analytical first step, one network call fewer',           is_flag=True, default=None)
@click.option('--sigmas',                  help='Few-step: the noise levels, sigma_max first (replace --steps, --rho)', metavar='LIST|FILE.json', type=str)

@click.option('--dg', 'dg_path',           help='Discriminator Guidance: discriminator-*.safetensors of train_discriminator.py', metavar='FILE|URL', type=str)
@click.option('--dg-classifier',           help="DG's published ADM classifier (32x32_classifier.pt), with --dg-head", metavar='PT', type=str)
@click.option('--dg-head',                 help="DG's published head (discriminator_60.pt, discriminator_250.pt)", metavar='PT', type=str)
@click.option('--dg-weight',               help='Weight of the DG correction at the Euler evaluation  [default: 2]', metavar='FLOAT', type=click.FloatRange(min=0))
@click.option('--dg-weight-2nd',           help="Weight of the DG correction at Heun's evaluation  [default: 0]", metavar='FLOAT', type=click.FloatRange(min=0))
@click.option('--dg-time-min',             help='Apply DG from this VP time on  [default: 0.01]', metavar='FLOAT', type=click.FloatRange(min=0, max=1))
@click.option('--dg-time-max',             help='Apply DG up to this VP time  [default: 1]', metavar='FLOAT', type=click.FloatRange(min=0, max=1))
@click.option('--dg-boosting',             help="DG's boosting: more churn and correction for samples the discriminator finds fake", is_flag=True, default=None)

def main(network_pkl, outdir, seeds, subdirs, force, class_idx, max_batch_size, grid, device, dg_path, dg_classifier, dg_head, ot_map_path, **sampler_kwargs):
    """Sample images from a trained EDM / EDM-AOT network, one PNG per seed.

    Without --solver/--disc/--schedule/--scaling this is EDM's Heun sampler; with any of them, the
    generalized ablation sampler. See docs/sampling.md.

    \b
    # 64 images on one GPU or the CPU, with a grid of them
    python generate.py --network=network-snapshot.pkl --outdir=out --seeds=0-63 --grid=grid.png

    \b
    # 50,000 images for FID, EDM-AOT's unconditional setting (27 NFE), 2 GPUs
    torchrun --standalone --nproc_per_node=2 generate.py --network=network-snapshot.pkl \\
        --outdir=out --seeds=0-49999 --subdirs --batch=200 --rho=90 --steps=14

    Stopped (Ctrl-C, SIGTERM) after the current batch, a run says how many images are done and the
    command that continues it: the same command, which skips the seeds whose PNG is in --outdir
    (--force makes them again). A continued run writes the same images as one without a break.
    --outdir/sampling.json records the sampler, NFE, noise levels and options of every image.
    """
    # Check the options that need no network before anything else.
    sampler_kwargs = {key: value for key, value in sampler_kwargs.items() if value is not None}
    dg_kwargs = {key: sampler_kwargs.pop(key) for key in list(sampler_kwargs) if key.startswith('dg_')}
    check_dg_options(dg_path, dg_classifier, dg_head, dg_kwargs, sampler_kwargs)
    check_few_step_options(sampler_kwargs)
    if sampler_kwargs.get('sigma_min', 0) >= sampler_kwargs.get('sigma_max', float('inf')):
        raise click.BadParameter(f'--sigma_min {sampler_kwargs["sigma_min"]} must be below --sigma_max {sampler_kwargs["sigma_max"]}', param_hint='--sigma_min')
    device, rank, world_size = start_processes(device)
    net, dg = load_models(network_pkl, dg_path, dg_classifier, dg_head, dg_kwargs, device, rank)
    ot_map, sampler = choose_sampler(net, sampler_kwargs, class_idx, ot_map_path, device)

    dist.print0(library.describe(sampler))
    # How the images are made, for sampling.json: levels are the solver's (few-step) or those the network is evaluated at.
    record = dict(sampler=sampler.name, nfe=sampler.nfe, options={key: value for key, value in sampler.kwargs.items() if key != 'sigmas'},
                  levels=sampler.levels, ot_map=file_setting(ot_map_path), guidance=None)
    sampler_fn, run_kwargs = sampler.fn, sampler.kwargs
    if ot_map is not None:
        dist.print0(ot_start.describe(ot_map, len(seeds)))
    if dg is not None: # not part of the dry run above
        sampler_fn, run_kwargs, settings = library.with_guidance(sampler, dg, **dg_kwargs)
        dist.print0(f'Discriminator guidance: weight {settings["dg_weight"]:g} (2nd order {settings.get("dg_weight_2nd", 0):g}), '
                    f'VP times {dg.time_min:g}-{dg.time_max:g}, boosting {"on" if settings.get("dg_boosting") else "off"}')
        record['guidance'] = dict(file=file_setting(dg_path) or [file_setting(dg_classifier), file_setting(dg_head)],
                                  time_min=dg.time_min, time_max=dg.time_max, **settings)
    if ot_map is not None:
        sampler_fn = ot_start.as_sampler(ot_map) # Heun from the map's targets (DG's if guided)
    draw = library.seed_drawer(net, device, class_idx, ot_map)

    folder, todo = open_folder(outdir, subdirs, force, seeds, jsonable(record), net, draw, max_batch_size, rank)
    stop, signum = StopRequest(), None
    progress = tqdm.tqdm(library.rank_batches(todo, max_batch_size, rank, world_size), unit='batch', disable=(rank != 0))
    try: # sampling stops at the first batch after a stop request; every batch sampled is still written and listed
        batches = itertools.takewhile(lambda _: signum is None, progress)
        write = lambda images, classes, batch_seeds: library.write_pngs(images, classes, batch_seeds, outdir, subdirs)
        generated = library.generate_images(net, sampler_fn, run_kwargs, batches, draw)
        for writing in library.write_behind(generated, write): # every rank stops at the same batch, so the ranks gather alike
            signum = record_batch(writing, folder, stop, len(seeds), outdir) or signum
    finally:
        progress.close()
        stop.restore()
    if signum is not None:
        if rank == 0:
            print(f'Interrupted: {len(folder.present)} of {len(seeds)} images are in "{outdir}"'
                  f'{" and listed in its dataset.json" if net.label_dim else ""}. Continue with:\n  {continue_command()}',
                  file=sys.stderr, flush=True)
        raise SystemExit(128 + signum)
    if grid is not None and rank == 0:
        save_grid(grid, outdir, [png_name(s, subdirs) for s in seeds[:GRID_MAX_IMAGES]], net.img_resolution)
    dist.print0('Done.')

#----------------------------------------------------------------------------
# main's steps: each calls the library and turns its errors into messages that name the flags.

def start_processes(device):
    """(device, rank, world size); torch.distributed joined (one process without torchrun)."""
    dist.init() # before touching the device: under torchrun it selects this process's GPU, which 'cuda' then means
    try:
        device = dist.device() if device is None else torch.device(device)
        torch.empty([], device=device)
    except (RuntimeError, AssertionError) as e:
        raise click.BadParameter(f'device "{device}" is not usable here ({one_line(e)}); try --device=cpu', param_hint='--device')
    return device, dist.get_rank(), dist.get_world_size()

def load_models(network_pkl, dg_path, dg_classifier, dg_head, dg_kwargs, device, rank):
    """(network, DiscriminatorGuidance or None); rank 0 loads first, so that a download lands in the
    cache once. Pops --dg-time-min/--dg-time-max from dg_kwargs."""
    if rank != 0:
        dist.barrier()
    net, dg, error = None, None, None
    try:
        net = load_network(network_pkl, device=device, verbose=(rank == 0))
    except Exception as e: # any failure to read or unpickle: report it, do not hang the other ranks
        reason = ' '.join(str(e).split()) if isinstance(e, OSError) else one_line(e)
        error = f'{reason} (--network takes a network-snapshot-*.pkl, a .safetensors file or a URL to one)'
    if error is None and (dg_path or dg_classifier):
        try:
            disc = guidance.load_discriminator(dg_path, device=device, verbose=(rank == 0)) if dg_path else \
                   guidance.load_dg_checkpoints(dg_classifier, dg_head, device=device)
            error = guidance.incompatibility(disc, net)
            if error is not None:
                error = f'Cannot guide with {dg_path or dg_head}: {error}'
            dg = DiscriminatorGuidance(disc, time_min=dg_kwargs.pop('dg_time_min', 0.01), time_max=dg_kwargs.pop('dg_time_max', 1.0))
        except IOError as e:
            error = ' '.join(str(e).split())
    if rank == 0:
        dist.barrier()
    fail_together(error)
    return net, dg

def choose_sampler(net, sampler_kwargs, class_idx, ot_map_path, device):
    """(OT map or None, library.Sampler) of the options, checked against the network (a dry run, no evaluation)."""
    error, ot_map, sampler = None, None, None
    if class_idx is not None and not net.label_dim:
        error = f'--class {class_idx} given, but the network is unconditional; drop --class'
    elif class_idx is not None and class_idx >= net.label_dim:
        error = f'--class {class_idx} is out of range: the network has classes 0-{net.label_dim - 1}'
    if ot_map_path is not None and error is None: # sets sigma_max = sigma_T, so the dry run below is OT-start's
        try:
            check_ot_map_options(sampler_kwargs, class_idx)
            ot_map = ot_start.map_for_generate(ot_map_path, net, device, sampler_kwargs)
        except (IOError, ValueError) as e:
            error = f'--ot-map {ot_map_path}: {" ".join(str(e).split())}'
    try:
        sampler = library.make_sampler(net, sampler_kwargs, device=device)
    except library.LevelsError as e:
        if not e.finite:
            error = error or 'Invalid sampler options: they give noise levels that are not finite numbers; check --sigma_min, --sigma_max and --disc'
        else:
            # The network's own range is often [0, inf] (EDMPrecond): name the sampler's actual top level instead.
            cap = f', at most the network\'s {float(net.sigma_max):g}' if np.isfinite(float(net.sigma_max)) else ''
            floor = f'; values below the network\'s sigma_min {float(net.sigma_min):g} are raised to it' if float(net.sigma_min) > 0 else ''
            error = error or (f'Invalid sampler options: noise levels {e.top:g} -> {e.bottom:g} do not decrease: --sigma_min must be below '
                              f'sigma_max = {e.top:g} (--sigma_max or the sampler\'s default{cap}){floor}')
    except ValueError as e:
        error = error or f'Invalid sampler options: {e}'
    fail_together(error)
    return ot_map, sampler

def open_folder(outdir, subdirs, force, seeds, record, net, draw, max_batch_size, rank):
    """(ImageFolder, the seeds still to do on every rank). Rank 0 decides which seeds remain in a
    folder that has some of the PNGs and brings its dataset.json and sampling.json up to date."""
    folder, todo, error = ImageFolder(outdir, subdirs, labelled=bool(net.label_dim)), None, None
    if rank == 0:
        try:
            classes_of = lambda chunk: [int(label.argmax()) for label in draw(chunk)[1]]
            todo = folder.open(seeds, record, force, classes_of, max_batch_size)
        except (OSError, ValueError) as e:
            error = f'--outdir {outdir}: {" ".join(str(e).split())}'
    fail_together(error)
    if rank == 0:
        if folder.mixed:
            other, diff = folder.mixed, folder.mixed_differences
            fix = '--force makes them again, ' if all(name in {png_name(seed, subdirs) for seed in seeds} for name in other) else ''
            print(f'Warning: {len(other)} images in "{outdir}" (e.g. {other[0]}) were made with other sampler settings ({"; ".join(diff[:3])}); '
                  f'they are kept and {RECORD} records how each image was made ({fix}another --outdir keeps sample sets apart)', file=sys.stderr, flush=True)
        kept = f'; {len(folder.present)} of the {len(seeds)} are there already and kept (--force makes them again)' if folder.present and not force else ''
        print(f'Generating {len(todo)} images to "{outdir}"{kept}...')
    return folder, dist.broadcast_object(todo)

def record_batch(writing, folder, stop, num_seeds, outdir):
    """Wait for a batch's PNGs; once every rank's are on disk, list them in dataset.json and
    sampling.json. Returns the signal that asks every rank to stop, if any rank got one; a failed
    write (disk full, quota, or any other error of the writer thread) stops every rank, not just the
    one that met it."""
    try:
        written, failure = writing.result(), None
    except OSError as e:
        written, failure = {}, ' '.join(str(e).split())
    except Exception as e: # not the file system's: named by its type
        written, failure = {}, one_line(e)
    gathered = [None] * dist.get_world_size()
    torch.distributed.all_gather_object(gathered, (written, stop.signal, failure))
    rank = dist.get_rank()
    if rank == 0:
        for part, _, _ in gathered:
            folder.add(part)
        folder.save()
    failure = next((f for _, _, f in gathered if f is not None), None)
    if failure is not None and rank == 0:
        raise click.ClickException(f'Cannot write the images: {failure}. {len(folder.present)} of {num_seeds} are in "{outdir}"; '
                                   f'make room or fix the folder, then continue with: {continue_command()}')
    if failure is not None:
        raise SystemExit(1)
    return next((s for _, s, _ in gathered if s is not None), None)

def save_grid(grid, outdir, names, resolution):
    """The grid is read back from the written files, so it holds every rank's images."""
    os.makedirs(os.path.dirname(os.path.abspath(grid)), exist_ok=True)
    images = []
    for name in names:
        with PIL.Image.open(os.path.join(outdir, name)) as image:
            images.append(np.array(image).reshape(resolution, resolution, -1))
    save_image_grid(np.stack(images), grid)
    print(f'Saved grid of {len(names)} images to "{grid}"')

#----------------------------------------------------------------------------

if __name__ == "__main__":
    main()

#----------------------------------------------------------------------------
