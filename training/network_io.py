"""Loading and saving networks: EDM/EDM-AOT snapshot pickles and a safe format.

Pickles (`network-snapshot-*.pkl`, a dict with 'ema', 'loss_fn', 'augment_pipe', 'dataset_kwargs')
carry the source code of their classes (torch_utils.persistence) and run it when loaded: only load
pickles you trust. The safe format is a .safetensors file: the state_dict, plus a JSON header entry
naming the class in this repository and its constructor kwargs. Loading it builds the network from
this repository's own code and copies the weights; nothing from the file is executed.
"""

import json
import os
import pickle
import re

import torch

import dnnlib

#----------------------------------------------------------------------------

SAFE_FORMAT = 'edm-network-safetensors-v1' # value of "format" in the header JSON
SAFE_METADATA_KEY = 'edm_network'          # header metadata entry that holds the JSON
TRUSTED_PREFIXES = ('training.',)          # load_safe only builds classes from these modules

#----------------------------------------------------------------------------

def _local_file(path_or_url, verbose):
    try:
        return dnnlib.util.open_url(path_or_url, verbose=verbose, return_filename=True)
    except IOError as err:
        raise IOError(f'Cannot read network {path_or_url}: {err}') from err

def _is_safetensors(path):
    # A safetensors file starts with an 8-byte little-endian header length and then the JSON header.
    with open(path, 'rb') as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b'{'

def load_pickle(path_or_url, verbose=True):
    """Unpickle a file (e.g. a whole training snapshot) after printing the notice that this runs code."""
    return _unpickle(_local_file(path_or_url, verbose), path_or_url, verbose)

def _unpickle(path, name, verbose):
    if verbose:
        print(f'Loading network from {name} (pickle: unpickling runs code; only load files you trust; convert with tools/convert_network.py)')
    try:
        with open(path, 'rb') as f:
            return pickle.load(f)
    except Exception as err: # a pickle can fail in any way, including inside the code it carries
        raise IOError(f'Cannot unpickle {name}: {type(err).__name__}: {err}. '
            'The file is corrupt, truncated, or not a network pickle') from err

SNAPSHOT_NAME = re.compile(r'network-snapshot-(\d+)\.(pkl|safetensors)')

def newest_snapshot(run_dir):
    """The newest network snapshot of a train.py run folder (its safe .safetensors file where both
    were written), or None when the folder has none."""
    found = [(int(m.group(1)), m.group(2) == 'safetensors', name) for name in os.listdir(run_dir)
             if (m := SNAPSHOT_NAME.fullmatch(name))]
    return os.path.join(run_dir, max(found)[2]) if found else None

def network_file(path_or_url, verbose=True):
    """path_or_url, or for a run folder its newest snapshot (saying which); IOError for a folder
    without snapshots."""
    if '://' in path_or_url or not os.path.isdir(path_or_url):
        return path_or_url
    snapshot = newest_snapshot(path_or_url)
    if snapshot is None:
        raise IOError(f'{path_or_url} is a folder with no network-snapshot-*.pkl or .safetensors in it; give a snapshot file')
    if verbose:
        print(f'Newest snapshot in {path_or_url}: {os.path.basename(snapshot)}')
    return snapshot

def load_network(path_or_url, device='cpu', verbose=True):
    """Network (torch.nn.Module, eval mode, on `device`) from an EDM/EDM-AOT snapshot pickle,
    a pickled module, or a safe-format .safetensors file; for a train.py run folder, its newest
    snapshot. Local paths and URLs work."""
    path_or_url = network_file(path_or_url, verbose)
    path = _local_file(path_or_url, verbose)
    if _is_safetensors(path):
        if verbose:
            print(f'Loading network from {path_or_url} (safetensors)')
        return load_safe(path, device=device)
    data = _unpickle(path, path_or_url, verbose)
    net = data.get('ema') if isinstance(data, dict) else data
    if not isinstance(net, torch.nn.Module):
        found = f'a dict with keys {sorted(data.keys())}' if isinstance(data, dict) else type(data).__name__
        raise IOError(f'{path_or_url} holds {found}, not a network; expected an EDM snapshot (dict with "ema") or a pickled torch.nn.Module')
    return net.eval().to(device)

#----------------------------------------------------------------------------

def class_name_of(net):
    """Importable name of the network's class, e.g. 'training.networks.EDMPrecond'.

    Classes unpickled from EDM pickles live in a generated `_imported_module_<hex>` module; EDM keeps
    all its networks in training/networks.py, so they map to the class of the same name there."""
    cls = type(net)
    if not cls.__module__.startswith('_imported_module_'):
        return f'{cls.__module__}.{cls.__qualname__}'
    from training import networks
    if not isinstance(getattr(networks, cls.__name__, None), type):
        raise ValueError(f'Cannot save {cls.__name__} in the safe format: training/networks.py has no class of that name')
    return f'training.networks.{cls.__name__}'

def save_safe(net, path):
    """Write the network's weights and constructor arguments to a .safetensors file (atomically)."""
    import safetensors.torch
    if not hasattr(net, 'init_kwargs'):
        raise ValueError(f'{type(net).__name__} does not record its constructor arguments; only persistent classes (torch_utils.persistence) can be saved in the safe format')
    header = dict(format=SAFE_FORMAT, class_name=class_name_of(net), init_args=list(net.init_args), init_kwargs=dict(net.init_kwargs))
    try:
        header_json = json.dumps(header)
    except TypeError as err:
        raise ValueError(f'Constructor arguments of {type(net).__name__} cannot be stored as JSON: {err}') from err
    # Clones: safetensors refuses tensors that share memory, and wants them contiguous on the CPU.
    tensors = {name: t.detach().to('cpu', copy=True).contiguous() for name, t in net.state_dict().items()}
    with dnnlib.util.atomic_write(path) as temp:
        safetensors.torch.save_file(tensors, temp, metadata={SAFE_METADATA_KEY: header_json})

def read_safe_header(path):
    """The JSON header of a safe-format file: dict with format, class_name, init_args, init_kwargs."""
    import safetensors
    try:
        with safetensors.safe_open(path, framework='pt') as f:
            metadata = f.metadata() or {}
    except Exception as err:
        raise IOError(f'Cannot read {path}: {err}. The file is corrupt or not a .safetensors file') from err
    if SAFE_METADATA_KEY not in metadata:
        raise IOError(f'{path} is a .safetensors file without network metadata; write it with training.network_io.save_safe or tools/convert_network.py')
    header = json.loads(metadata[SAFE_METADATA_KEY])
    if header.get('format') != SAFE_FORMAT:
        raise IOError(f'{path}: unsupported safe-format version {header.get("format")!r} (expected {SAFE_FORMAT!r})')
    return header

def load_safe(path, device='cpu', trusted_prefixes=TRUSTED_PREFIXES):
    """Build the network named in the file from this repository's code and load its weights (strict)."""
    import safetensors.torch
    header = read_safe_header(path)
    class_name = header['class_name']
    # Only classes of this repository: a file must not be able to call arbitrary functions.
    if not class_name.startswith(tuple(trusted_prefixes)):
        raise IOError(f'{path} names class {class_name!r}, which is outside the trusted modules {", ".join(trusted_prefixes)}')
    cls = dnnlib.util.get_obj_by_name(class_name)
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        raise IOError(f'{path} names {class_name!r}, which is not a network class')
    net = cls(*header['init_args'], **header['init_kwargs'])
    try:
        state = safetensors.torch.load_file(path, device='cpu')
    except Exception as err:
        raise IOError(f'Cannot read the weights in {path}: {err}') from err
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise IOError(f'The weights in {path} do not fit {class_name}: {err}') from err
    return net.eval().to(device)

#----------------------------------------------------------------------------
