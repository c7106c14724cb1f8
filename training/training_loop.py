"""Main training loop: EDM's, with noise paired to images by AOT pools, exact resume and
snapshots in both EDM's pickle format and the safe format."""

import atexit
import contextlib
import copy
import functools
import hashlib
import json
import multiprocessing
import os
import pickle
import signal
import time

import numpy as np
import psutil
import torch

import dnnlib
from torch_utils import distributed as dist
from torch_utils import misc
from torch_utils import training_stats
from training import network_io
from training import sampling
from training.dataset import class_list
from sampling.images import save_image_grid, to_uint8
from training.monitor import Monitor
from training.pools import PoolStream, iterate_slices
from training.run_dir import ROLLING_STATE, STATE_FORMAT, load_training_state

STOP_SIGNALS = [signal.SIGINT, signal.SIGTERM] + ([signal.SIGUSR1] if hasattr(signal, 'SIGUSR1') else [])

#----------------------------------------------------------------------------

def _rng_state(device):
    state = dict(cpu=torch.get_rng_state())
    if device.type == 'cuda':
        state['cuda'] = torch.cuda.get_rng_state(device)
    return state

def _set_rng_state(state, device):
    torch.set_rng_state(state['cpu'])
    if device.type == 'cuda' and 'cuda' in state:
        torch.cuda.set_rng_state(state['cuda'], device)

def _float32_output(module, args, output):
    # bf16 autocast inside the U-Net only: the preconditioning and the loss stay in fp32.
    return output.float()

@contextlib.contextmanager
def _signals_blocked(signals):
    if not hasattr(signal, 'pthread_sigmask'): # Windows: no signal masks
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)

def _pool_worker_init(ending, worker_id):
    # Pool workers run beside the trainer: one thread each keeps them from competing with it.
    torch.set_num_threads(1)
    # Stop signals also reach the workers (Ctrl-C goes to the process group, SLURM's SIGTERM to every
    # process): the trainer decides when to stop and needs its pools until then. SIGTERM is also how
    # the DataLoader and multiprocessing end workers once the trainer is done: obeyed only then.
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(0) if ending.is_set() else None)
    if hasattr(signal, 'pthread_sigmask'): # blocked by the trainer while it started this process; any pending one is now ignored
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)

def _gather_objects(obj):
    if dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out

@torch.no_grad()
def save_sample_grid(net, path, num_images=64, num_steps=18, device=torch.device('cpu')):
    """A grid of EMA samples from fixed seeds, so successive snapshots can be compared by eye.
    Uses its own generators: the trainer's RNG stream is left untouched."""
    seeds = list(range(num_images))
    latents, class_labels, rnd = sampling.latents_for_seeds(net, seeds, device=device)
    images = sampling.edm_sampler(net, latents, class_labels, randn_like=rnd.randn_like, num_steps=num_steps)
    scale = max(1, 64 // net.img_resolution) # small images enlarged to be seen
    save_image_grid(to_uint8(images), path, scale=scale, gap=scale)

class Interrupted(Exception):
    """Training stopped on a signal, after all ranks finished the same step and the state was saved."""

LAUNCHER_GONE = 1 << 8 # a stop request beside the signal numbers: torchrun's agent (our parent) has exited

def stop_reason(code):
    return 'the loss of the launcher (torchrun)' if code == LAUNCHER_GONE else signal.Signals(code).name

class StopRequests:
    """Stop signals (SIGINT, SIGTERM, SIGUSR1), the death of torchrun's agent and the rolling-dump
    clock, agreed by all ranks.

    A signal may reach only some ranks (SLURM can signal one process; torchrun forwards SIGTERM to
    all), an agent that dies (SIGKILL, or a SIGUSR1 it does not handle) leaves the workers of its
    node alone, and clocks differ between ranks, so each rank notes its own requests and the ranks
    take their maximum. The all_reduce runs over the default process group, no other (no gloo group
    beside NCCL), in the background: it is started after one step and read after the next, so it
    rarely waits for another rank. On gloo it reduces CPU tensors; on NCCL a device tensor, read
    back through a stream of its own and a pinned buffer, so that the host waits for the previous
    step's all_reduce only, never for the step just queued (no host sync of the training stream).
    The agent's death is seen by its parent pid changing: no store or process of its is needed, as
    the store it hosts dies with it. All ranks act on the same result, one step after the request."""

    def __init__(self, dump_seconds, device):
        self.dump_seconds = dump_seconds
        self.last_dump = time.time()
        self.received = 0
        self.device = device if torch.distributed.get_backend() == 'nccl' else None # NCCL reduces device tensors only
        self.stream = torch.cuda.Stream(device) if self.device is not None else None
        self.pending = None
        self.previous = {sig: signal.signal(sig, self._handler) for sig in STOP_SIGNALS}

    def _handler(self, signum, frame):
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt # a second Ctrl-C stops at once, without saving
        self.received = self.received or signum # no print here: it could interrupt a print of the loop

    def poll(self):
        """(stop request or 0, whether a rolling dump is due), as agreed after the previous step."""
        if dist.launcher_gone():
            self.received = self.received or LAUNCHER_GONE
        due = self.dump_seconds is not None and time.time() - self.last_dump >= self.dump_seconds
        flags = torch.tensor([self.received, int(due)], dtype=torch.int64, pin_memory=self.device is not None)
        if self.device is None:
            work = torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX, async_op=True)
            started = (work, flags)
        else:
            flags = flags.to(self.device, non_blocking=True)
            work = torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX, async_op=True)
            with torch.cuda.stream(self.stream):
                work.wait() # this stream, not the training stream, waits for the all_reduce
                host = torch.empty(2, dtype=torch.int64, pin_memory=True).copy_(flags, non_blocking=True)
                done = torch.cuda.Event()
                done.record()
            started = (done, host, flags) # flags stays referenced until the copy is done
        agreed, self.pending = self.pending, started
        if agreed is None:
            return 0, False
        agreed[0].wait() if self.device is None else agreed[0].synchronize()
        values = agreed[1].tolist()
        return int(values[0]), bool(values[1])

    def close(self, stopped):
        if self.pending is not None:
            self.pending[0].wait() if self.device is None else self.pending[0].synchronize()
        # A stopped process ignores further signals on its way out, also while the interpreter shuts
        # down (it resets Python handlers, not SIG_IGN): once one rank has exited, torchrun sends
        # SIGTERM to the others, which would turn their status 75 into a kill.
        for sig, handler in self.previous.items():
            signal.signal(sig, signal.SIG_IGN if stopped else handler)

def settle_ddp_buckets(ddp, loss_fn, shapes, device, bf16=False):
    """DDP regroups the gradients into new buckets after its first backward pass (in the order they
    became ready). With three or more ranks the sums round differently in the other layout, so a
    resumed run, whose first step would use the initial layout, would drift from the uninterrupted
    one. One throwaway pass on zeros, before training, gives every run its final layout from the
    first step on. The random streams are left as they were; the gradients are dropped. The pass
    runs under the training steps' autocast: a compiled network (--compile) guards on it and would
    otherwise compile again at the first step."""
    with torch.random.fork_rng(devices=[device] if device.type == 'cuda' else []):
        inputs = {name: torch.zeros(shape, device=device) if shape else None for name, shape in shapes.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(net=ddp, **inputs)
        loss.sum().backward()
    ddp.zero_grad(set_to_none=True)

#----------------------------------------------------------------------------

class PoolLog:
    """Called with each pool as the loop takes it: reports the pairing's statistics and sums the
    seconds the loop waited for pools (the tick's aot_wait)."""
    def __init__(self, aot_pool):
        self.aot_pool, self.wait, self.warned_alone = aot_pool, 0.0, False

    def __call__(self, pool, seconds):
        self.wait += seconds
        training_stats.report('Timing/aot_wait_sec', seconds)
        stats = pool['stats']
        for key in ('cost_before', 'cost_after', 'noise_norm', 'noise_proj'):
            training_stats.report(f'AOT/{key}', stats[key])
        training_stats.report('AOT/alone_frac', stats['alone'])
        if self.aot_pool and stats['alone'] >= 0.25 and not self.warned_alone:
            self.warned_alone = True
            dist.print0(f'Warning: {stats["alone"]:.0%} of the images of a pool are alone in their class among the {self.aot_pool} '
                        'and keep unpaired noise; a larger --aot pairs more of them.')

#----------------------------------------------------------------------------

def training_loop(
    run_dir             = '.',      # Output directory.
    dataset_kwargs      = {},       # Options for training set.
    data_loader_kwargs  = {},       # Options for torch.utils.data.DataLoader.
    network_kwargs      = {},       # Options for model and preconditioning.
    loss_kwargs         = {},       # Options for loss function.
    optimizer_kwargs    = {},       # Options for optimizer.
    augment_kwargs      = None,     # Options for augmentation pipeline, None = disable.
    seed                = 0,        # Global random seed.
    batch_size          = 512,      # Total batch size for one training iteration.
    batch_gpu           = None,     # Batch per GPU and accumulation round (train.py checks it divides batch_size / GPUs), None = no accumulation.
    total_kimg          = 200000,   # Training duration, measured in thousands of training images.
    ema_halflife_kimg   = 500,      # Half-life of the exponential moving average (EMA) of model weights.
    ema_rampup_ratio    = 0.05,     # EMA ramp-up coefficient, None = no rampup.
    lr_rampup_kimg      = 10000,    # Learning rate ramp-up duration.
    loss_scaling        = 1,        # Fixed loss scaling factor, as EDM (also with fp16): no step is ever skipped.
    kimg_per_tick       = 50,       # Interval of progress prints.
    snapshot_ticks      = 50,       # How often to save network snapshots, None = disable.
    state_dump_ticks    = 500,      # How often to dump training state, None = disable.
    state_dump_minutes  = 30,       # How often to replace the rolling training state, None = disable.
    resume_pkl          = None,     # Start from the given network snapshot, None = random initialization.
    resume_state_dump   = None,     # Start from the given training state, None = reset training state.
    resume_kimg         = 0,        # Start from the given training progress (EDM state dumps only).
    cudnn_benchmark     = True,     # Enable torch.backends.cudnn.benchmark?
    aot_pool            = 512,      # AOT pool per GPU: images paired with noise at once, 0 = plain EDM.
    aot_solver          = 'scipy',  # Assignment solver for training.aot.assign.
    nearest_of          = 0,        # Nearest of K candidate noises per image instead of AOT (aot_pool = 0), 0 = off.
    grid_images         = 64,       # Images in the sample grid saved with each snapshot, 0 = none.
    grid_steps          = 18,       # Heun steps for the sample grid.
    metric_every        = 0,        # Ticks between FD metrics of EMA samples (training/monitor.py), 0 = none.
    metric_images       = 1000,     # EMA samples, and training images, of the FD metric.
    metric_detector     = 'standin',# Features of the FD metric: 'standin', 'inception', or a detector pickle.
    tf32                = False,    # Allow TF32 matmuls and convolutions on CUDA (EDM's numerics: off).
    bf16                = False,    # bf16 autocast inside the U-Net (EDM's numerics: off).
    compile             = False,    # torch.compile the network for training.
    deterministic       = False,    # Deterministic algorithms only (exact resume on CUDA; slower).
):
    # Initialize.
    start_time = time.time()
    device = dist.device()
    np.random.seed((seed * dist.get_world_size() + dist.get_rank()) % (1 << 31))
    torch.manual_seed(np.random.randint(1 << 31))
    torch.backends.cudnn.benchmark = cudnn_benchmark and not deterministic
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False # EDM's --fp16 numerics
    if deterministic:
        os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8') # read when cuBLAS starts, i.e. at the first matmul below
        torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True, warn_only=True) # a warning names any op that has no deterministic version

    # Batch per GPU: train.py has checked the sizes and explained any inconsistency to the user.
    batch_gpu_total = batch_size // dist.get_world_size()
    batch_gpu = batch_gpu or batch_gpu_total
    num_accumulation_rounds = batch_gpu_total // batch_gpu
    pool_size = aot_pool or batch_gpu
    assert pool_size % batch_gpu == 0
    slices_per_pool = pool_size // batch_gpu

    # Load dataset.
    dist.print0('Loading dataset...')
    dataset_obj = dnnlib.util.construct_class_by_name(**dataset_kwargs)
    if dataset_obj.class_names is not None: # which label is which class, also in the run's log.txt
        dist.print0(f'Classes: {class_list(dataset_obj.class_names, limit=None)}')

    # Construct network.
    dist.print0('Constructing network...')
    interface_kwargs = dataset_obj.interface
    net = dnnlib.util.construct_class_by_name(**network_kwargs, **interface_kwargs)
    net.train().requires_grad_(True).to(device)
    if dist.get_world_size() > 1:
        # Ranks were seeded differently; before torch 2.13, DDP without a buffer sync at each forward
        # leaves the buffers (NCSN++'s random Fourier frequencies) unsynced: rank 0's values everywhere.
        with torch.no_grad(): # else autograd records the in-place broadcast into every parameter's graph
            for tensor in misc.params_and_buffers(net):
                torch.distributed.broadcast(tensor, src=0)
    if dist.get_rank() == 0:
        with torch.no_grad():
            images = torch.zeros([batch_gpu, net.img_channels, net.img_resolution, net.img_resolution], device=device)
            sigma = torch.ones([batch_gpu], device=device)
            labels = torch.zeros([batch_gpu, net.label_dim], device=device)
            misc.print_module_summary(net, [images, sigma, labels], max_nesting=2)

    # Setup optimizer.
    dist.print0('Setting up optimizer...')
    loss_fn = dnnlib.util.construct_class_by_name(**loss_kwargs)
    optimizer = dnnlib.util.construct_class_by_name(params=net.parameters(), **optimizer_kwargs)
    augment_pipe = dnnlib.util.construct_class_by_name(**augment_kwargs) if augment_kwargs is not None else None
    ddp = net
    if dist.get_world_size() > 1:
        ddp = dist.wrap_ddp(net, device)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    forward = ddp
    if bf16: # registered after the EMA copy: snapshots carry no hook
        net.model.register_forward_hook(_float32_output)
    if compile:
        forward = torch.compile(ddp)
    if ddp is not net:
        settle_ddp_buckets(forward, loss_fn, device=device, bf16=bf16, shapes=dict(images=[batch_gpu, net.img_channels, net.img_resolution, net.img_resolution],
            labels=[batch_gpu, net.label_dim], noise=[batch_gpu, net.img_channels, net.img_resolution, net.img_resolution],
            augment_labels=[batch_gpu, network_kwargs['augment_dim']] if augment_pipe is not None else None))

    # Resume training from previous snapshot or state.
    cur_nimg = resume_kimg * 1000
    cur_tick = 0
    tick_start_nimg = None # where the current tick began, when a state saved within it says so
    rng_states = None
    if resume_pkl is not None:
        dist.print0(f'Loading network weights from "{resume_pkl}"...')
        src = network_io.load_network(resume_pkl, verbose=(dist.get_rank() == 0))
        misc.copy_params_and_buffers(src_module=src, dst_module=net, require_all=False)
        misc.copy_params_and_buffers(src_module=src, dst_module=ema, require_all=False)
        del src
    if resume_state_dump:
        dist.print0(f'Loading training state from "{resume_state_dump}"...')
        data = load_training_state(resume_state_dump)
        if data.get('format') == STATE_FORMAT:
            net.load_state_dict(data['net'])
            ema.load_state_dict(data['ema'])
            cur_nimg, cur_tick = data['cur_nimg'], data['cur_tick']
            tick_start_nimg = data.get('tick_start_nimg')
            if len(data['rng_states']) == dist.get_world_size():
                rng_states = data['rng_states'][dist.get_rank()]
            else:
                dist.print0('Note: GPU count differs from the interrupted run; random streams are re-seeded.')
        else: # EDM's format: the network object itself; EMA comes from the matching snapshot pickle.
            misc.copy_params_and_buffers(src_module=data['net'], dst_module=net, require_all=True)
        optimizer.load_state_dict(data['optimizer_state'])
        del data
    if cur_nimg >= round(total_kimg * 1000):
        dist.print0(f'The run has trained for {cur_nimg / 1e3:g} kimg, its whole --duration: nothing to do. Train on with a longer --duration.')
        return

    # Setup the pool stream: pools are a pure function of (seed, rank, index), so resuming
    # just starts at the right pool and slice.
    slices_done = (cur_nimg // batch_size) * num_accumulation_rounds
    # Without worker processes the pools are built in this process, on the training device, when the
    # loop needs the next one.
    in_process = data_loader_kwargs.get('num_workers', 0) == 0
    pool_stream = PoolStream(dataset_obj, pool_size, seed=seed, rank=dist.get_rank(), num_replicas=dist.get_world_size(),
        augment_pipe=augment_pipe, pair=aot_pool > 0, solver=aot_solver, start_pool=slices_done // slices_per_pool,
        device=device if in_process else 'cpu', nearest_of=nearest_of)
    if in_process:
        pools = iter(pool_stream)
    else: # the DataLoader draws its workers' base seed from a generator of its own: the trainer's streams stay as with --workers 0
        ending = multiprocessing.Event() # set when this process exits, however it does: then workers obey SIGTERM
        atexit.register(ending.set)      # (runs before multiprocessing's own exit handler, which terminates them)
        # Workers are spawned (a fresh interpreter importing torch for seconds): stop signals stay
        # blocked in them until their init ignores them (the mask survives exec); here they wait as pending.
        with _signals_blocked(STOP_SIGNALS):
            pools = iter(torch.utils.data.DataLoader(pool_stream, batch_size=None, worker_init_fn=functools.partial(_pool_worker_init, ending),
                                                     generator=torch.Generator(), **data_loader_kwargs))
    pool_log = PoolLog(aot_pool)
    slices = iterate_slices(pools, batch_gpu, skip=slices_done % slices_per_pool, device=device, on_pool=pool_log)
    if rng_states is not None:
        _set_rng_state(rng_states, device)

    # Train. From here on a stop signal saves the state.
    requests = StopRequests(state_dump_minutes * 60 if state_dump_minutes else None, device)
    stopped = False
    dist.print0(f'Training for {total_kimg} kimg: batch {batch_size} ({batch_gpu} per GPU x {num_accumulation_rounds} rounds x {dist.get_world_size()} GPUs), '
                + (f'AOT pool {aot_pool} per GPU ({aot_solver})' if aot_pool else f'nearest of {nearest_of} noises per image' if nearest_of
                   else 'AOT off (plain EDM noise)'))
    dist.print0()
    tick_start_nimg = cur_nimg if tick_start_nimg is None else tick_start_nimg
    tick_start_time = time.time()
    maintenance_time = tick_start_time - start_time
    stats_jsonl = None
    seen_images = hashlib.sha1() # which images this rank trained on, compared across ranks at the end
    nonfinite_steps = torch.zeros([], device=device) # steps whose gradients had NaN/Inf; read once per tick (no sync per step)
    interface = dict(img_resolution=net.img_resolution, img_channels=net.img_channels, label_dim=net.label_dim)
    monitor = Monitor(run_dir, cur_nimg, kimg_per_tick, dataset_obj, metric_every, metric_images, metric_detector, grid_steps, batch_gpu, device)

    def save_state(name, next_tick, next_tick_start_nimg):
        """Full dump of the training state, tensors and plain values only (it loads safely), written
        atomically by rank 0; every rank takes part (the random states are gathered)."""
        state = dict(format=STATE_FORMAT, net=net.state_dict(), ema=ema.state_dict(), optimizer_state=optimizer.state_dict(),
                     seed=seed, cur_nimg=cur_nimg, cur_tick=next_tick, tick_start_nimg=next_tick_start_nimg,
                     rng_states=_gather_objects(_rng_state(device)), batch_size=batch_size, aot_pool=aot_pool, # train.py checks
                     nearest_of=nearest_of, world_size=dist.get_world_size(), **interface)                  # these on resume
        path = os.path.join(run_dir, name) if dist.get_rank() == 0 else None
        if path is not None:
            with dnnlib.util.atomic_write(path) as tmp:
                torch.save(state, tmp)
        requests.last_dump = time.time()
        return path

    def save_if_asked(stop_signal, rolling_due):
        """The rolling state when due or on a stop signal; then, on a signal, the end of training."""
        if stop_signal or rolling_due:
            path = save_state(ROLLING_STATE, cur_tick, tick_start_nimg)
        if stop_signal:
            raise Interrupted(f'Stopped by {stop_reason(stop_signal)} at kimg {cur_nimg / 1e3:.3f}: training state saved to {path}')

    try:
        while True:

            # Accumulate gradients.
            optimizer.zero_grad(set_to_none=True)
            for round_idx in range(num_accumulation_rounds):
                with misc.ddp_sync(ddp, (round_idx == num_accumulation_rounds - 1)):
                    part = next(slices)
                    seen_images.update(part['indices'].numpy().tobytes())
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                        loss = loss_fn(net=forward, images=part['images'], labels=part['labels'], noise=part['noise'],
                                       augment_labels=part['augment_labels'])
                    training_stats.report('Loss/loss', loss)
                    loss.sum().mul(loss_scaling / batch_gpu_total).backward()

            # Update weights: EDM's fixed loss scale, NaN/Inf in gradients replaced, never skipped.
            for g in optimizer.param_groups:
                g['lr'] = optimizer_kwargs['lr'] * min(cur_nimg / max(lr_rampup_kimg * 1000, 1e-8), 1)
            nonfinite_steps += misc.nan_to_num_grads_(net)
            optimizer.step()

            # Update EMA.
            ema_halflife_nimg = ema_halflife_kimg * 1000
            if ema_rampup_ratio is not None:
                ema_halflife_nimg = min(ema_halflife_nimg, cur_nimg * ema_rampup_ratio)
            ema_beta = 0.5 ** (batch_size / max(ema_halflife_nimg, 1e-8))
            misc.ema_update_(ema.parameters(), net.parameters(), ema_beta)

            # Perform maintenance tasks once per tick, and save the state when asked.
            cur_nimg += batch_size
            monitor.step(cur_nimg, tick_start_nimg)
            done = (cur_nimg >= round(total_kimg * 1000)) # whole images: 0.11296 Mimg is 112960.00000000001 in floats
            stop_signal, rolling_due = requests.poll()
            if (not done) and (cur_tick != 0) and (cur_nimg < tick_start_nimg + kimg_per_tick * 1000):
                save_if_asked(stop_signal, rolling_due)
                continue

            # Print status line, accumulating the same information in training_stats.
            tick_end_time = time.time()
            tick_time = tick_end_time - tick_start_time
            wait = torch.tensor(pool_log.wait, device=device)
            if dist.get_world_size() > 1:
                torch.distributed.all_reduce(wait, op=torch.distributed.ReduceOp.MAX) # the slowest rank holds up all
            wait_frac = wait.item() / max(tick_time, 1e-8)
            metric_field = monitor.tick(ema, cur_tick, done) # before the statistics are collected
            fields = []
            fields += [f"tick {training_stats.report0('Progress/tick', cur_tick):<5d}"]
            fields += [f"kimg {training_stats.report0('Progress/kimg', cur_nimg / 1e3):<9.3f}"]
            fields += [f"time {dnnlib.util.format_time(training_stats.report0('Timing/total_sec', tick_end_time - start_time)):<12s}"]
            fields += [f"sec/tick {training_stats.report0('Timing/sec_per_tick', tick_time):<7.1f}"]
            fields += [f"sec/kimg {training_stats.report0('Timing/sec_per_kimg', tick_time / max(cur_nimg - tick_start_nimg, 1) * 1e3):<7.2f}"]
            fields += [f"aot_wait {training_stats.report0('Timing/aot_wait_frac', wait_frac):<6.1%}"]
            fields += [f"maintenance {training_stats.report0('Timing/maintenance_sec', maintenance_time):<6.1f}"]
            fields += [f"cpumem {training_stats.report0('Resources/cpu_mem_gb', psutil.Process(os.getpid()).memory_info().rss / 2**30):<6.2f}"]
            if device.type == 'cuda':
                fields += [f"gpumem {training_stats.report0('Resources/peak_gpu_mem_gb', torch.cuda.max_memory_allocated(device) / 2**30):<6.2f}"]
                torch.cuda.reset_peak_memory_stats()
            bad_steps = int(training_stats.report0('Progress/nonfinite_steps', nonfinite_steps.item()))
            nonfinite_steps.zero_()
            training_stats.default_collector.update()
            fields.insert(2, f"loss {training_stats.default_collector['Loss/loss']:<8.4f}")
            if aot_pool or nearest_of: # how much closer the pairing brought each image's noise (mean distance)
                before, after = training_stats.default_collector['AOT/cost_before'], training_stats.default_collector['AOT/cost_after']
                fields.insert(3, f"{'aot' if aot_pool else 'nearest'}_gain {1 - after / max(before, 1e-8):<5.1%}")
            if bad_steps:
                fields += [f'nonfinite_steps {bad_steps}']
            if metric_field:
                fields += [metric_field]
            dist.print0(' '.join(fields))

            # Save network snapshot: EDM's pickle, the safe format of the EMA weights, and a sample grid.
            if (snapshot_ticks is not None) and (done or cur_tick % snapshot_ticks == 0):
                data = dict(ema=ema, loss_fn=loss_fn, augment_pipe=augment_pipe, dataset_kwargs=dict(dataset_kwargs))
                for key, value in data.items():
                    if isinstance(value, torch.nn.Module):
                        value = copy.deepcopy(value).eval().requires_grad_(False)
                        misc.check_ddp_consistency(value)
                        data[key] = value.cpu()
                    del value
                if dist.get_rank() == 0:
                    name = f'network-snapshot-{cur_nimg//1000:06d}'
                    with dnnlib.util.atomic_write(os.path.join(run_dir, f'{name}.pkl')) as tmp, open(tmp, 'wb') as f:
                        pickle.dump(data, f)
                    network_io.save_safe(data['ema'], os.path.join(run_dir, f'{name}.safetensors'))
                    if grid_images:
                        grid_path = os.path.join(run_dir, f'samples-{cur_nimg//1000:06d}.png')
                        save_sample_grid(ema, grid_path, grid_images, grid_steps, device)
                        monitor.log_grid(grid_path, cur_nimg)
                del data

            # Save full dump of the training state; the rolling one, older now, goes.
            state_dumped = (state_dump_ticks is not None) and (done or cur_tick % state_dump_ticks == 0) and cur_tick != 0
            if state_dumped:
                save_state(f'training-state-{cur_nimg//1000:06d}.pt', cur_tick + 1, cur_nimg)
                if dist.get_rank() == 0 and os.path.exists(os.path.join(run_dir, ROLLING_STATE)):
                    os.remove(os.path.join(run_dir, ROLLING_STATE))

            # Update logs.
            if dist.get_rank() == 0:
                if stats_jsonl is None:
                    stats_jsonl = open(os.path.join(run_dir, 'stats.jsonl'), 'at')
                stats_jsonl.write(json.dumps(dict(training_stats.default_collector.as_dict(), timestamp=time.time())) + '\n')
                stats_jsonl.flush()
                monitor.log_stats(training_stats.default_collector.as_dict(), cur_nimg)

            # Update state.
            cur_tick += 1
            tick_start_nimg = cur_nimg
            tick_start_time = time.time()
            maintenance_time = tick_start_time - tick_end_time
            pool_log.wait = 0.0
            if done:
                break
            save_if_asked(stop_signal, rolling_due and not state_dumped)
    except Interrupted:
        stopped = True
        dist.barrier() # every rank leaves once the state is on disk
        raise
    finally:
        requests.close(stopped)
        monitor.close()

    # All ranks must end with the same weights, each having trained on its own images.
    if dist.get_world_size() > 1:
        weights = hashlib.sha1(b''.join(t.detach().cpu().numpy().tobytes() for t in net.state_dict().values())).hexdigest()
        fingerprints = _gather_objects((weights, seen_images.hexdigest()))
        if len({w for w, _ in fingerprints}) != 1:
            raise RuntimeError('Weights differ between ranks after training; DDP synchronisation failed')
        distinct = len({s for _, s in fingerprints}) == len(fingerprints)
        dist.print0(f'Rank check: weights identical on all {len(fingerprints)} ranks; '
                    + ('each rank trained on its own images.' if distinct else 'WARNING: ranks trained on the same images.'))

    # Done.
    dist.print0()
    dist.print0('Exiting...')

#----------------------------------------------------------------------------
