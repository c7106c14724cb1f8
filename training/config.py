"""A run's configuration: the options of train.py (a dict keyed by option name) -> the training
loop's arguments, checked before anything is written. Refusals are OptionError (training/errors.py),
naming options by key; warnings name them as the caller names them."""

import os

import torch

import dnnlib
from torch_utils import distributed as dist
from training import aot, pools, run_dir
from training.errors import Opt, OptionError, plain_name, render

# Unconditional pools above this go to solver knn: an exact solve grows as the cube of the pool
# (times: docs/training.md, "Choosing the pool size and solver").
MAX_EXACT_POOL = 8192
# Network architectures (arch) and preconditionings with their losses (precond), as in EDM.
ARCHS = {
    'ddpmpp': dict(model_type='SongUNet', embedding_type='positional', encoder_type='standard', decoder_type='standard',
                   channel_mult_noise=1, resample_filter=[1,1], model_channels=128, channel_mult=[2,2,2]),
    'ncsnpp': dict(model_type='SongUNet', embedding_type='fourier', encoder_type='residual', decoder_type='standard',
                   channel_mult_noise=2, resample_filter=[1,3,3,1], model_channels=128, channel_mult=[2,2,2]),
    'adm':    dict(model_type='DhariwalUNet', model_channels=192, channel_mult=[1,2,3,4]),
}
PRECONDS = {'vp': 'VP', 've': 'VE', 'edm': 'EDM'} # every loss takes the AOT-paired noise

#----------------------------------------------------------------------------

def probe_dataset(dataset_kwargs, opts):
    """The dataset's name and interface (resolution, channels, classes); dataset_kwargs gets its
    resolution and size. OptionError for anything that makes it unusable."""
    try:
        dataset_obj = dnnlib.util.construct_class_by_name(**dataset_kwargs)
        dataset_kwargs.resolution = dataset_obj.resolution # be explicit about dataset resolution
        dataset_kwargs.max_size = len(dataset_obj) # be explicit about dataset size
        if opts.cond and not dataset_obj.has_labels:
            raise OptionError('no-labels', Opt('cond', 1), f' requires labels, but {opts.data} has no dataset.json '
                              'with labels; add one or use ', Opt('cond', 0))
        res = dataset_obj.resolution
        if res < 4 or res & (res - 1):
            # dataset_tool.py's option, not this run's: named as that program names it.
            raise OptionError('resolution', f'Dataset resolution {res} is not a power of two; convert with dataset_tool.py --resolution')
        dataset_obj.check_images() # a damaged image stops the run here, before its folder exists
        return dataset_obj.name, dataset_obj.interface
    except OptionError:
        raise
    except (IOError, OSError, ValueError) as err:
        raise OptionError('dataset', 'Cannot use dataset ', Opt('data', opts.data), f': {err}') from err

def check_sizes(opts, label_dim, world, num_images, name=plain_name):
    """The per-GPU batch; refuses what EDM-AOT silently got wrong (dropped or empty slices), and
    warns of a pool larger than the dataset (options named by name(option, value))."""
    if opts.batch % world:
        raise OptionError('batch', Opt('batch', opts.batch), f' is not divisible by the number of GPUs ({world}); '
                          f'use a multiple of {world}')
    per_gpu = opts.batch // world
    batch_gpu = min(opts.batch_gpu or per_gpu, per_gpu)
    if per_gpu % batch_gpu:
        raise OptionError('batch', Opt('batch', opts.batch), f' over {world} GPU(s) is {per_gpu} per GPU, not a multiple of ',
                          Opt('batch_gpu', batch_gpu))
    if opts.nearest_of == 1:
        raise OptionError('coupling', Opt('nearest_of', 1), ' is plain EDM noise; use ', Opt('nearest_of', 'K'),
                          ' with K >= 2, or 0 for off')
    if opts.nearest_of and opts.aot:
        raise OptionError('coupling', Opt('nearest_of', opts.nearest_of), ' and ', Opt('aot', opts.aot), ' are two couplings '
                          'of noise to images; use ', Opt('aot', 0), ' with ', Opt('nearest_of'))
    if opts.aot and opts.aot % batch_gpu:
        nearest = max(opts.aot // batch_gpu, 1) * batch_gpu
        raise OptionError('pool', Opt('aot', opts.aot), f' is not a multiple of the per-GPU batch {batch_gpu}; use e.g. ',
                          Opt('aot', nearest))
    try:
        aot.check_solver(opts.aot_solver)
    except ValueError as err:
        raise OptionError('solver', Opt('aot_solver', opts.aot_solver), f': {err}') from err
    if opts.aot_solver in aot.DENSE_SOLVERS and not label_dim and opts.aot > MAX_EXACT_POOL:
        cost = f'minutes per pool and {opts.aot ** 2 * 8 / 2**30:.0f} GiB'
        raise OptionError('solver', Opt('aot_solver', opts.aot_solver), f' would solve exact assignments of {opts.aot} '
                          f'noises: {cost}; use ', Opt('aot_solver', 'knn'), ' (within 1% of exact, docs/aot-scale.md) '
                          f'or at most {MAX_EXACT_POOL}')
    if opts.aot > num_images:
        # The suggestion must pass the check above: a multiple of the per-GPU batch.
        fit = num_images // batch_gpu * batch_gpu
        larger = ['Warning: ', Opt('aot', opts.aot), f' is larger than the dataset ({num_images} images): '
                  'every pool holds some images more than once. ']
        advice = ['Use ', Opt('aot', fit), ' or less for distinct images in a pool.'] if fit else \
                 [f'No pool of distinct images is a multiple of the per-GPU batch {batch_gpu}; a smaller ', Opt('batch'), ' allows one.']
        dist.print0(render(larger + advice, name))
    return batch_gpu

def pool_workers(opts, label_dim):
    """The pool worker processes per rank, 'auto' resolved: as many as keep the GPU from waiting, one
    on the CPU; knn pools in the training process, on the GPU (pools.auto_workers)."""
    if opts.workers != 'auto':
        return opts.workers
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    cores_per_rank = cores // dist.get_local_world_size()
    return pools.auto_workers(opts.aot, label_dim, cores_per_rank, dist.use_cuda(), opts.aot_solver)

def training_config(opts, world, name=plain_name):
    """The training loop's arguments for these options on `world` GPUs, checked, and the run's
    description; OptionError for options that cannot train. Warnings name options by name(option,
    value). Every rank calls it: the seed drawn here is rank 0's on all of them."""
    c = dnnlib.EasyDict()
    c.dataset_kwargs = dnnlib.EasyDict(class_name='training.dataset.ImageFolderDataset', path=opts.data,
                                       use_labels=opts.cond, xflip=opts.xflip, cache=opts.cache)
    precond = PRECONDS[opts.precond]
    c.network_kwargs = dnnlib.EasyDict(ARCHS[opts.arch], class_name=f'training.networks.{precond}Precond')
    c.loss_kwargs = dnnlib.EasyDict(class_name=f'training.loss.{precond}Loss')
    c.optimizer_kwargs = dnnlib.EasyDict(class_name='torch.optim.Adam', lr=opts.lr, betas=[0.9,0.999], eps=1e-8)
    dataset_name, interface = probe_dataset(c.dataset_kwargs, opts)
    workers = pool_workers(opts, interface['label_dim'])
    c.data_loader_kwargs = dnnlib.EasyDict(pin_memory=dist.use_cuda(), num_workers=workers)
    if workers > 0: # each worker builds one pool ahead: enough overlap, no waste
        c.data_loader_kwargs.update(prefetch_factor=1, persistent_workers=True)

    # Network and training options.
    if opts.cbase is not None:
        c.network_kwargs.model_channels = opts.cbase
    if opts.cres is not None:
        c.network_kwargs.channel_mult = opts.cres
    if opts.augment:
        c.augment_kwargs = dnnlib.EasyDict(class_name='training.augment.AugmentPipe', p=opts.augment)
        c.augment_kwargs.update(xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)
        c.network_kwargs.augment_dim = 9
    c.network_kwargs.update(dropout=opts.dropout, use_fp16=opts.fp16)
    c.total_kimg = opts.duration * 1000 # fractional kimg allowed: short CPU runs
    c.ema_halflife_kimg = int(opts.ema * 1000)
    c.lr_rampup_kimg = opts.lr_rampup
    c.update(batch_size=opts.batch, batch_gpu=opts.batch_gpu, loss_scaling=opts.ls, cudnn_benchmark=opts.bench)
    c.update(tf32=opts.tf32, bf16=opts.bf16, compile=opts.compile, deterministic=opts.deterministic)
    if opts.bf16 and opts.fp16:
        raise OptionError('precision', Opt('bf16'), ' and ', Opt('fp16', 1), ' are two kinds of mixed precision; choose one')
    c.update(kimg_per_tick=opts.tick, snapshot_ticks=opts.snap or None, state_dump_ticks=opts.dump or None)
    c.update(state_dump_minutes=opts.dump_minutes or None)
    c.update(aot_pool=opts.aot, aot_solver=opts.aot_solver, nearest_of=opts.nearest_of, grid_images=opts.grid)
    c.update(metric_every=opts.metric_every, metric_images=opts.metric_images, metric_detector=opts.metric_detector)
    c.batch_gpu = check_sizes(opts, interface['label_dim'], world, c.dataset_kwargs.max_size, name) # the loop takes it as checked here
    c.seed = opts.seed if opts.seed is not None else int(torch.randint(1 << 31, size=[]))

    # Transfer learning and resume, checked before the run folder exists. A resumed transfer run
    # keeps the EMA without ramp-up.
    if opts.transfer is not None:
        c.ema_rampup_ratio = None
    if opts.transfer is not None and opts.resume is None:
        c.update(run_dir.transfer_from(opts.transfer, c.network_kwargs, interface))
    elif opts.resume is not None:
        pools_from = dict(batch=opts.batch, aot=opts.aot, nearest_of=opts.nearest_of, seed=opts.seed)
        c.update(run_dir.resume_from(opts.resume, c.network_kwargs, interface, world, **pools_from))
    c.seed = dist.broadcast_object(c.seed)

    # Description string.
    cond_str = 'cond' if c.dataset_kwargs.use_labels else 'uncond'
    dtype_str = 'fp16' if c.network_kwargs.use_fp16 else 'bf16' if opts.bf16 else 'fp32'
    setup = f'gpus{world:d}-batch{c.batch_size:d}-{dtype_str}'
    desc = f'{dataset_name:s}-{cond_str:s}-{opts.arch:s}-{opts.precond:s}-{setup}'
    if opts.desc is not None:
        desc += f'-{opts.desc}'
    return c, desc
