"""Report scalar statistics from anywhere in the code and collect them, reduced across ranks.

    training_stats.report('Loss/loss', loss)        # any rank, any tensor shape: every element counts
    training_stats.report0('Progress/kimg', kimg)   # rank 0 only (other ranks contribute nothing)
    stats = training_stats.Collector(regex='.*')    # in the training loop
    stats.update()                                  # all ranks together: sums across ranks
    stats.mean('Loss/loss'), stats.std(...), stats.num(...), stats.as_dict()

Each name keeps three float64 moments (count, sum, sum of squares) per device; update() adds them
up across ranks with one all_reduce. All ranks must call update() at the same time, with the same
set of names reported (report0 registers the name on every rank for this reason).
"""

import re

import numpy as np
import torch

import dnnlib

from . import misc

#----------------------------------------------------------------------------

_num_moments    = 3             # [count, sum, sum of squares]
_reduce_dtype   = torch.float32 # dtype the reported values are converted to
_counter_dtype  = torch.float64 # dtype of the accumulated moments
_rank           = 0             # this process's rank
_sync_device    = None          # device for all_reduce; None = single process
_sync_called    = False         # init_multiprocessing() must come before the first sync
_counters       = dict()        # name => device => moments since the last sync
_cumulative     = dict()        # name => moments summed over all syncs (CPU)

#----------------------------------------------------------------------------

def init_multiprocessing(rank, sync_device):
    """Set this process's rank and the device to all_reduce on (None for a single process).
    gloo needs a CPU device, NCCL a CUDA one."""
    global _rank, _sync_device
    # Changing the set-up after statistics were synced would mix single- and multi-process sums.
    # Setting the same values again (e.g. a second single-process init in one interpreter) is fine.
    assert not _sync_called or (rank, sync_device) == (_rank, _sync_device), \
        'init_multiprocessing() must be called before the first Collector.update()'
    _rank = rank
    _sync_device = sync_device

#----------------------------------------------------------------------------

@misc.profiled_function
def report(name, value):
    """Add every element of `value` (number, list, array or tensor) to the statistic `name`."""
    if name not in _counters:
        _counters[name] = dict()
    elems = torch.as_tensor(value)
    if elems.numel() == 0:
        return value
    elems = elems.detach().flatten().to(_reduce_dtype)
    moments = torch.stack([torch.ones_like(elems).sum(), elems.sum(), elems.square().sum()]).to(_counter_dtype)
    device = moments.device
    if device not in _counters[name]:
        _counters[name][device] = torch.zeros_like(moments)
    _counters[name][device].add_(moments)
    return value

def report0(name, value):
    """Like report(), but only rank 0's value counts."""
    report(name, value if _rank == 0 else [])
    return value

#----------------------------------------------------------------------------

class Collector:
    """Reads the statistics whose names match `regex`, as accumulated between update() calls.
    With keep_previous, a statistic nobody reported since the last update keeps its old value."""

    def __init__(self, regex='.*', keep_previous=True):
        self._regex = re.compile(regex)
        self._keep_previous = keep_previous
        self._cumulative = dict()
        self._moments = dict()
        self.update()
        self._moments.clear()

    def names(self):
        return [name for name in _counters if self._regex.fullmatch(name)]

    def update(self):
        if not self._keep_previous:
            self._moments.clear()
        for name, cumulative in _sync(self.names()):
            if name not in self._cumulative:
                self._cumulative[name] = torch.zeros([_num_moments], dtype=_counter_dtype)
            delta = cumulative - self._cumulative[name]
            self._cumulative[name].copy_(cumulative)
            if float(delta[0]) != 0:
                self._moments[name] = delta

    def _get_delta(self, name):
        assert self._regex.fullmatch(name), f'{name!r} does not match the collector regex'
        if name not in self._moments:
            self._moments[name] = torch.zeros([_num_moments], dtype=_counter_dtype)
        return self._moments[name]

    def num(self, name):
        return int(self._get_delta(name)[0])

    def mean(self, name):
        delta = self._get_delta(name)
        if int(delta[0]) == 0:
            return float('nan')
        return float(delta[1] / delta[0])

    def std(self, name):
        delta = self._get_delta(name)
        if int(delta[0]) == 0 or not np.isfinite(float(delta[1])):
            return float('nan')
        if int(delta[0]) == 1:
            return 0.0
        mean = float(delta[1] / delta[0])
        raw_var = float(delta[2] / delta[0])
        return float(np.sqrt(max(raw_var - mean ** 2, 0)))

    def as_dict(self):
        """{name: EasyDict(num, mean, std)} for every matching name, e.g. to write as JSON lines."""
        return dnnlib.EasyDict({name: dnnlib.EasyDict(num=self.num(name), mean=self.mean(name), std=self.std(name))
            for name in self.names()})

    def __getitem__(self, name):
        return self.mean(name)

#----------------------------------------------------------------------------

def _sync(names):
    """Sum the counters of `names` across devices and ranks into _cumulative; return (name, moments)."""
    global _sync_called
    if len(names) == 0:
        return []
    _sync_called = True
    names = sorted(names) # ranks may have reported in different orders; all_reduce needs one order

    device = _sync_device if _sync_device is not None else torch.device('cpu')
    deltas = []
    for name in names:
        delta = torch.zeros([_num_moments], dtype=_counter_dtype, device=device)
        for counter in _counters[name].values():
            delta.add_(counter.to(device))
            counter.zero_()
        deltas.append(delta)
    deltas = torch.stack(deltas)
    if _sync_device is not None:
        torch.distributed.all_reduce(deltas)

    deltas = deltas.cpu()
    for idx, name in enumerate(names):
        if name not in _cumulative:
            _cumulative[name] = torch.zeros([_num_moments], dtype=_counter_dtype)
        _cumulative[name].add_(deltas[idx])
    return [(name, _cumulative[name]) for name in names]

#----------------------------------------------------------------------------

default_collector = Collector()

#----------------------------------------------------------------------------
