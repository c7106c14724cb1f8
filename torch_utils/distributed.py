"""torch.distributed set-up from torchrun's environment, and rank-aware helpers.

Under torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT set), init() joins the
process group on the device that choose_device() picks, with the backend that choose_backend()
picks from the GPUs of all ranks (exchanged through the rendezvous store): NCCL when every rank has
a GPU of its own, gloo otherwise. Started as a plain `python prog.py`, it creates a one-process gloo
group on an in-memory store (no port, no network), so code that calls torch.distributed
collectives works unchanged in both cases.
"""

import atexit
import collections
import datetime
import inspect
import os
import socket

import torch

from . import training_stats

#----------------------------------------------------------------------------

def choose_device(local_rank, num_gpus):
    """This process's device: a GPU whenever one is visible (a CPU rank beside idle GPUs is never
    what was meant), local rank mod the visible GPUs, so that ranks sharing GPUs go round them."""
    return torch.device('cuda', local_rank % num_gpus) if num_gpus else torch.device('cpu')

def choose_backend(gpus, nccl_available):
    """('nccl' or 'gloo', why gloo or None) for a group whose rank r runs on the GPU gpus[r]: a
    string that names the physical GPU (its UUID), None for a rank on the CPU. Every rank decides
    from the same list, so all take the same backend. NCCL needs a GPU per rank: it is used when
    the ranks' GPUs are distinct, however the launcher shows them (all GPUs of the node to each
    process, or one each: per-task binding, where every process sees its own GPU as cuda:0)."""
    if all(gpu is None for gpu in gpus):
        return 'gloo', None
    on_cpu = [rank for rank, gpu in enumerate(gpus) if gpu is None]
    if on_cpu:
        return 'gloo', f'rank(s) {_ranks(on_cpu)} have no GPU'
    if not nccl_available:
        return 'gloo', 'this torch has no NCCL'
    counts = collections.Counter(gpus)
    shared = [rank for rank, gpu in enumerate(gpus) if counts[gpu] > 1]
    if shared:
        return 'gloo', (f'rank(s) {_ranks(shared)} share GPUs ({len(gpus)} ranks on {len(counts)} GPUs), '
                        'and NCCL needs a GPU per process. Use --nproc_per_node at most the number of GPUs')
    return 'nccl', None

def _ranks(ranks):
    return ','.join(map(str, ranks[:8])) + (f',... ({len(ranks)} in all)' if len(ranks) > 8 else '')

def gpu_identity(dev):
    """What names the physical GPU behind `dev` (the same whatever CUDA_VISIBLE_DEVICES calls it):
    its UUID, else host and PCI address; None for the CPU."""
    if dev.type != 'cuda':
        return None
    props = torch.cuda.get_device_properties(dev)
    if getattr(props, 'uuid', None) is not None:
        return f'uuid {props.uuid}'
    if hasattr(props, 'pci_bus_id'):
        return f'{socket.gethostname()} pci {props.pci_domain_id:x}:{props.pci_bus_id:x}:{props.pci_device_id:x}'
    return f'{socket.gethostname()} {dev}' # no physical name: ranks that see the same index are taken to share it

def _num_gpus():
    return torch.cuda.device_count() if torch.cuda.is_available() else 0

def _exchange(store, rank, world_size, value):
    """Every rank's value (a string) through the rendezvous store, before the process group exists."""
    store = torch.distributed.PrefixStore('edm-aot/gpus', store)
    store.set(str(rank), value)
    keys = [str(r) for r in range(world_size)]
    store.wait(keys)
    return [v.decode() for v in store.multi_get(keys)]

def get_local_world_size():
    return int(os.environ.get('LOCAL_WORLD_SIZE', '1'))

def use_cuda():
    """True when this process runs on a GPU (see choose_device)."""
    return device().type == 'cuda'

def init():
    global _launcher
    if torch.distributed.is_initialized():
        return
    if 'TORCHELASTIC_RUN_ID' in os.environ: # started by torchrun: its agent is our parent (launcher_gone)
        _launcher = os.getppid()
    dev = device()
    if dev.type == 'cuda':
        torch.cuda.set_device(dev)
    if 'WORLD_SIZE' in os.environ and 'RANK' in os.environ:
        timeout = datetime.timedelta(minutes=30) # the store's, as init_process_group gives it for gloo
        store, rank, world_size = next(torch.distributed.rendezvous('env://', timeout=timeout))
        store.set_timeout(timeout)
        gpus = _exchange(store, rank, world_size, gpu_identity(dev) or '')
        backend, reason = choose_backend([gpu or None for gpu in gpus], torch.distributed.is_nccl_available())
        if reason and dev.type == 'cuda': # every rank that falls back says so: ranks may see different GPUs
            print(f'Warning (rank {rank}): local rank {get_local_rank()} runs on {dev} with gloo instead of NCCL '
                  f'(slower gradient exchange): {reason}.', flush=True)
        torch.distributed.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size)
    else:
        store = torch.distributed.HashStore()
        torch.distributed.init_process_group(backend='gloo', store=store, rank=0, world_size=1)
    # Leave the group cleanly at exit: otherwise gloo's threads can abort the interpreter on the
    # way out ("terminate called without an active exception") and turn success into a crash.
    atexit.register(_shutdown)
    sync_device = dev if get_world_size() > 1 else None
    training_stats.init_multiprocessing(rank=get_rank(), sync_device=sync_device)

def _shutdown():
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()

#----------------------------------------------------------------------------

def get_rank():
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0

def get_world_size():
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1

def get_local_rank():
    return int(os.environ.get('LOCAL_RANK', '0'))

def device():
    """This process's device: a visible GPU when there is one (choose_device), else the CPU."""
    return choose_device(get_local_rank(), _num_gpus())

_launcher = None # the pid of torchrun's agent, recorded by init()

def launcher_gone():
    """True once the torchrun agent that started this process has exited (killed, say, by a signal
    it does not handle): its workers, in sessions of their own, would otherwise train on as orphans."""
    return _launcher is not None and os.getppid() != _launcher

def barrier():
    if torch.distributed.is_initialized() and get_world_size() > 1:
        torch.distributed.barrier()

def broadcast_object(obj, src=0):
    """Rank src's obj on every rank (any picklable value)."""
    if get_world_size() == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src, device=device())
    return box[0]

def wrap_ddp(module, dev):
    """DistributedDataParallel with no buffer sync at each forward (EDM's broadcast_buffers=False):
    the caller broadcasts rank 0's parameters and buffers once. torch 2.13 renamed the flag to
    forward_sync_buffers and warns at the old name; earlier releases know only the old one."""
    ddp = torch.nn.parallel.DistributedDataParallel
    flag = 'forward_sync_buffers' if 'forward_sync_buffers' in inspect.signature(ddp).parameters else 'broadcast_buffers'
    return ddp(module, device_ids=[dev] if dev.type == 'cuda' else None, **{flag: False})

def print0(*args, **kwargs):
    if get_rank() == 0:
        print(*args, **kwargs)

#----------------------------------------------------------------------------
