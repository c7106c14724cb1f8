"""torch.distributed set-up from torchrun's environment, and rank-aware helpers.

Under torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT set), init() joins the
process group with the device and backend that choose_device() picks: NCCL when every process of
the node has a GPU of its own, gloo otherwise. Started as a plain `python prog.py`, it creates a
one-process gloo group on an in-memory store (no port, no network), so code that calls
torch.distributed collectives works unchanged in both cases.
"""

import atexit
import os

import torch

from . import training_stats

#----------------------------------------------------------------------------

def choose_device(local_rank, local_world_size, num_gpus, nccl_available):
    """(device, backend, warning or None) for one process of a node, from what it can see.

    A GPU is used whenever one is visible: a CPU rank beside idle GPUs is never what was meant.
    NCCL needs a GPU per process; with fewer visible GPUs than processes (two ranks sharing one
    GPU, or a launcher that gives each process one visible GPU but reports the node's process
    count) the ranks go round the visible GPUs with gloo, which takes CUDA tensors, and say so."""
    if num_gpus == 0:
        return torch.device('cpu'), 'gloo', None
    device = torch.device('cuda', local_rank % num_gpus)
    if local_world_size > num_gpus:
        return device, 'gloo', (f'{local_world_size} processes per node (LOCAL_WORLD_SIZE) but {num_gpus} visible GPU(s): '
            f'local rank {local_rank} runs on {device} with gloo instead of NCCL, which needs a GPU per process '
            '(slower gradient exchange). Use --nproc_per_node at most the number of GPUs.')
    if not nccl_available:
        return device, 'gloo', f'this torch has no NCCL: local rank {local_rank} runs on {device} with gloo (slower gradient exchange).'
    return device, 'nccl', None

def _choice():
    return choose_device(get_local_rank(), get_local_world_size(), torch.cuda.device_count() if torch.cuda.is_available() else 0,
                         torch.distributed.is_nccl_available())

def get_local_world_size():
    return int(os.environ.get('LOCAL_WORLD_SIZE', '1'))

def use_cuda():
    """True when this process runs on a GPU (see choose_device)."""
    return device().type == 'cuda'

def init():
    if torch.distributed.is_initialized():
        return
    dev, backend, warning = _choice()
    if dev.type == 'cuda':
        torch.cuda.set_device(dev)
    if 'WORLD_SIZE' in os.environ and 'RANK' in os.environ:
        torch.distributed.init_process_group(backend=backend, init_method='env://')
        if warning: # every rank that falls back says so: ranks may see different GPUs
            print(f'Warning (rank {get_rank()}): {warning}', flush=True)
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
    return _choice()[0]

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

def print0(*args, **kwargs):
    if get_rank() == 0:
        print(*args, **kwargs)

#----------------------------------------------------------------------------
