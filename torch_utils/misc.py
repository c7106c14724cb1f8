"""Tensor and module helpers used across training and sampling."""

import contextlib
import re
import warnings

import numpy as np
import torch

#----------------------------------------------------------------------------
# Cached construction of constant tensors. Avoids re-creating the same tensor on every call
# (and the host-to-device copy that comes with it).

_constant_cache = dict()

def constant(value, shape=None, dtype=None, device=None, memory_format=None):
    value = np.asarray(value)
    if shape is not None:
        shape = tuple(shape)
    if dtype is None:
        dtype = torch.get_default_dtype()
    if device is None:
        device = torch.device('cpu')
    if memory_format is None:
        memory_format = torch.contiguous_format

    key = (value.shape, value.dtype, value.tobytes(), shape, dtype, device, memory_format)
    tensor = _constant_cache.get(key, None)
    if tensor is None:
        tensor = torch.as_tensor(value.copy(), dtype=dtype, device=device)
        if shape is not None:
            tensor = tensor.expand(torch.broadcast_shapes(tensor.shape, shape))
        tensor = tensor.contiguous(memory_format=memory_format)
        _constant_cache[key] = tensor
    return tensor

#----------------------------------------------------------------------------
# Shape check that understands None (any size) and works under tracing.

@contextlib.contextmanager
def suppress_tracer_warnings():
    flt = ('ignore', None, torch.jit.TracerWarning, None, 0)
    warnings.filters.insert(0, flt)
    try:
        yield
    finally:
        warnings.filters.remove(flt)

def assert_shape(tensor, ref_shape):
    if tensor.ndim != len(ref_shape):
        raise AssertionError(f'Wrong number of dimensions: got {tensor.ndim}, expected {len(ref_shape)}')
    for idx, (size, ref_size) in enumerate(zip(tensor.shape, ref_shape)):
        if ref_size is None:
            pass
        elif isinstance(ref_size, torch.Tensor):
            with suppress_tracer_warnings(): # the tracer warns about comparing traced sizes; the check is intended
                torch._assert(torch.equal(torch.as_tensor(size), ref_size), f'Wrong size for dimension {idx}')
        elif isinstance(size, torch.Tensor):
            with suppress_tracer_warnings():
                torch._assert(torch.equal(size, torch.as_tensor(ref_size)), f'Wrong size for dimension {idx}: expected {ref_size}')
        elif size != ref_size:
            raise AssertionError(f'Wrong size for dimension {idx}: got {size}, expected {ref_size}')

#----------------------------------------------------------------------------
# Per-step parameter arithmetic in a few kernels instead of one or two per parameter (~400 for
# EDM's U-Nets), with EDM's numbers bit for bit.

@torch.no_grad()
def nan_to_num_grads_(module, nan=0.0, posinf=1e5, neginf=-1e5):
    """Replace NaN/Inf in every parameter gradient of `module`, in place, with EDM's values; returns
    a device bool, True when some gradient was not finite (read it when convenient: no host sync).
    The gradients are cleaned as one flat copy: elementwise, so equal to EDM's per-gradient
    nan_to_num, at the price of one gradient-sized buffer for the moment."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros([], dtype=torch.bool)
    flat = torch.cat([g.flatten() for g in grads])
    nonfinite = flat.isfinite().all().logical_not()
    torch.nan_to_num(flat, nan=nan, posinf=posinf, neginf=neginf, out=flat)
    torch._foreach_copy_(grads, [part.view_as(g) for part, g in zip(flat.split([g.numel() for g in grads]), grads)])
    return nonfinite

@torch.no_grad()
def ema_update_(ema_params, net_params, beta):
    """EDM's EMA step, p_ema.copy_(p_net.detach().lerp(p_ema, beta)), for all parameters at once."""
    ema_params, net_params = list(ema_params), list(net_params)
    torch._foreach_copy_(ema_params, torch._foreach_lerp(net_params, ema_params, beta))

#----------------------------------------------------------------------------
# Name a function in the autograd profiler's trace.

def profiled_function(fn):
    def decorator(*args, **kwargs):
        with torch.autograd.profiler.record_function(fn.__name__):
            return fn(*args, **kwargs)
    decorator.__name__ = fn.__name__
    decorator.__doc__ = fn.__doc__
    return decorator

#----------------------------------------------------------------------------
# Parameters and buffers.

def params_and_buffers(module):
    assert isinstance(module, torch.nn.Module)
    return list(module.parameters()) + list(module.buffers())

def named_params_and_buffers(module):
    assert isinstance(module, torch.nn.Module)
    return list(module.named_parameters()) + list(module.named_buffers())

@torch.no_grad()
def copy_params_and_buffers(src_module, dst_module, require_all=False):
    """Copy every parameter and buffer of `dst_module` that `src_module` has under the same name."""
    assert isinstance(src_module, torch.nn.Module) and isinstance(dst_module, torch.nn.Module)
    src_tensors = dict(named_params_and_buffers(src_module))
    missing = []
    for name, tensor in named_params_and_buffers(dst_module):
        if name not in src_tensors:
            missing.append(name)
            continue
        if src_tensors[name].shape != tensor.shape:
            raise ValueError(f'copy_params_and_buffers: {name} has shape {tuple(src_tensors[name].shape)} in the source, {tuple(tensor.shape)} in the destination')
        tensor.copy_(src_tensors[name])
    if require_all and missing:
        raise ValueError(f'copy_params_and_buffers: source lacks {len(missing)} tensor(s): {", ".join(missing[:5])}{" ..." if len(missing) > 5 else ""}')

#----------------------------------------------------------------------------
# DDP helpers.

@contextlib.contextmanager
def ddp_sync(module, sync):
    """Skip DDP's gradient all-reduce when sync is False (gradient accumulation); no-op for plain modules."""
    assert isinstance(module, torch.nn.Module)
    if sync or not isinstance(module, torch.nn.parallel.DistributedDataParallel):
        yield
    else:
        with module.no_sync():
            yield

def check_ddp_consistency(module, ignore_regex=None):
    """Assert that every parameter and buffer equals rank 0's (NaNs compare equal). Every rank runs
    all broadcasts before raising, so a mismatch cannot leave the other ranks waiting forever."""
    assert isinstance(module, torch.nn.Module)
    mismatches = []
    for name, tensor in named_params_and_buffers(module):
        fullname = type(module).__name__ + '.' + name
        if ignore_regex is not None and re.fullmatch(ignore_regex, fullname):
            continue
        tensor = tensor.detach()
        if tensor.is_floating_point():
            tensor = torch.nan_to_num(tensor)
        other = tensor.clone()
        torch.distributed.broadcast(tensor=other, src=0)
        if not (tensor == other).all():
            mismatches.append(fullname)
    assert not mismatches, f'DDP inconsistency: {", ".join(mismatches)} differ(s) from rank 0'

#----------------------------------------------------------------------------
# Table of submodules with parameter counts and output shapes, from one forward pass.

@torch.no_grad()
def print_module_summary(module, inputs, max_nesting=3, skip_redundant=True):
    assert isinstance(module, torch.nn.Module) and not isinstance(module, torch.jit.ScriptModule)
    assert isinstance(inputs, (tuple, list))

    entries = [] # (module, [output tensors]) in the order forward() returns
    nesting = [0]
    def pre_hook(_mod, _inputs):
        nesting[0] += 1
    def post_hook(mod, _inputs, outputs):
        nesting[0] -= 1
        if nesting[0] <= max_nesting:
            outputs = list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]
            entries.append((mod, [t for t in outputs if isinstance(t, torch.Tensor)]))
    hooks = [mod.register_forward_pre_hook(pre_hook) for mod in module.modules()]
    hooks += [mod.register_forward_hook(post_hook) for mod in module.modules()]
    try:
        outputs = module(*inputs)
    finally:
        for hook in hooks:
            hook.remove()

    # Count each tensor once, at the first (innermost) module that reports it.
    seen = set()
    rows = [['Name', 'Parameters', 'Buffers', 'Output shape', 'Datatype'], ['---'] * 5]
    names = {mod: name for name, mod in module.named_modules()}
    total_params = total_buffers = 0
    for mod, outs in entries:
        params = [t for t in mod.parameters() if id(t) not in seen]
        buffers = [t for t in mod.buffers() if id(t) not in seen]
        seen.update(id(t) for t in params + buffers)
        out_ids = {id(t) for t in outs}
        if skip_redundant and not params and not buffers and out_ids <= seen:
            continue # adds nothing to the table
        seen.update(out_ids)
        n_params = sum(t.numel() for t in params)
        n_buffers = sum(t.numel() for t in buffers)
        total_params += n_params
        total_buffers += n_buffers
        name = '<top-level>' if mod is module else names.get(mod, type(mod).__name__)
        for k, t in enumerate(outs or [None]):
            rows.append([name + (f':{k}' if len(outs) > 1 else ''),
                str(n_params) if k == 0 and n_params else '-',
                str(n_buffers) if k == 0 and n_buffers else '-',
                str(list(t.shape)) if t is not None else '-',
                str(t.dtype).split('.')[-1] if t is not None else '-'])
    rows += [['---'] * 5, ['Total', str(total_params), str(total_buffers), '', '']]

    widths = [max(len(row[c]) for row in rows) for c in range(5)]
    print()
    for row in rows:
        print('  '.join(cell + ' ' * (w - len(cell)) for cell, w in zip(row, widths)).rstrip())
    print()
    return outputs

#----------------------------------------------------------------------------
