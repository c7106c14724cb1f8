"""torch.distributed set-up from torchrun's environment, and rank-aware helpers.

Under torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT set), init() joins the
process group with NCCL when every process of the node gets its own GPU, and with gloo on the CPU
otherwise (no GPU, or more processes per node than GPUs: NCCL cannot share one GPU between ranks).
Started as a plain `python prog.py`, it creates a one-process gloo group on an in-memory store (no
port, no network), so code that calls torch.distributed collectives works unchanged in both cases.
"""

import atexit
import os

import torch

from . import training_stats

#----------------------------------------------------------------------------

def get_local_world_size():
    return int(os.environ.get('LOCAL_WORLD_SIZE', '1'))

def use_cuda():
    """True when this process trains on a GPU of its own: CUDA is present and the node has at
    least as many GPUs as processes."""
    return torch.cuda.is_available() and get_local_world_size() <= torch.cuda.device_count()

def init():
    if torch.distributed.is_initialized():
        return
    if 'WORLD_SIZE' in os.environ and 'RANK' in os.environ:
        backend = 'nccl' if use_cuda() and torch.distributed.is_nccl_available() else 'gloo'
        if use_cuda():
            torch.cuda.set_device(device())
        torch.distributed.init_process_group(backend=backend, init_method='env://')
        if torch.cuda.is_available() and not use_cuda():
            print0(f'Warning: {get_local_world_size()} processes per node but {torch.cuda.device_count()} GPU(s): '
                   'every rank runs on the CPU with gloo. Use --nproc_per_node at most the number of GPUs.')
    else:
        store = torch.distributed.HashStore()
        torch.distributed.init_process_group(backend='gloo', store=store, rank=0, world_size=1)
        if use_cuda():
            torch.cuda.set_device(device())
    # Leave the group cleanly at exit: otherwise gloo's threads can abort the interpreter on the
    # way out ("terminate called without an active exception") and turn success into a crash.
    atexit.register(_shutdown)
    sync_device = device() if get_world_size() > 1 else None
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
    """This process's device: cuda:LOCAL_RANK when it has a GPU of its own (use_cuda), else the CPU."""
    if use_cuda():
        return torch.device('cuda', get_local_rank())
    return torch.device('cpu')

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
