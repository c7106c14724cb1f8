"""The run folder and its rules: what a run records, its newest training state, whether options
continue the run, and whether weights fit the network a run builds (resume and transfer).

Refusals are RunDirError, an OptionError (training/errors.py): their text names options by their
keys in the options dict (str(err): 'resume=runs/x: ...'); a program names them its own way with
err.message(name) (train.py: '--resume=runs/x: ...')."""

import glob
import json
import os
import pickle
import re

import torch

import dnnlib
from torch_utils import distributed as dist
from training import network_io
from training.dataset import ImageFolderDataset
from training.errors import Opt, OptionError

STATE_FORMAT = 'edm-aot-training-state/1'
ROLLING_STATE = 'training-state-latest.pt' # replaced every --dump-minutes and on a stop signal
OPTIONS_FILE = 'training_options.json'     # the loop's arguments, and the options under 'command_line'

# Options of one invocation, not of the run: not recorded, not compared on resume.
PER_INVOCATION = ['resume', 'dry_run']
# Options that change what is watched or saved, never what is trained: a resume may give them anew.
WATCHING = ['metric_every', 'metric_images', 'metric_detector', 'dump_minutes']
# Options the pools (images, noise, pairings) and their order follow from, and their keys in a state.
POOL_OPTIONS = {'batch': 'batch_size', 'aot': 'aot_pool', 'nearest_of': 'nearest_of', 'seed': 'seed'}
INTERFACE = ('img_resolution', 'img_channels', 'label_dim')

#----------------------------------------------------------------------------

class RunDirError(OptionError):
    """A refusal of the run folder's rules."""

#----------------------------------------------------------------------------
# Training states and the newest one.

def load_training_state(path):
    """Our own state dumps hold only tensors and plain values and load without running code;
    EDM's hold the pickled network and need weights_only=False (a notice is printed)."""
    try:
        return torch.load(path, map_location='cpu', weights_only=True, mmap=True) # mmap: reading a few keys stays cheap
    except pickle.UnpicklingError:
        dist.print0(f'Loading EDM training state {path}: it contains pickled code; load only files you trust.')
        return torch.load(path, map_location='cpu', weights_only=False)

def state_nimg(path):
    """Training images done in a state file: cur_nimg in ours; from the name (kimg) in EDM's,
    which pickle code; -1 for a damaged file."""
    try:
        return int(torch.load(path, map_location='cpu', weights_only=True, mmap=True)['cur_nimg'])
    except Exception: # any damage, or EDM's pickled state
        match = re.search(r'training-state-(\d+)\.pt$', path)
        return int(match.group(1)) * 1000 if match else -1

def latest_state(run_dir):
    """Newest training state in run_dir, or None: the highest training-state-NNNNNN.pt, unless the
    rolling training-state-latest.pt holds more training (it is replaced every --dump-minutes)."""
    numbered = sorted(glob.glob(os.path.join(run_dir, 'training-state-[0-9]*.pt')))
    rolling = os.path.join(run_dir, ROLLING_STATE)
    if not os.path.isfile(rolling):
        return numbered[-1] if numbered else None
    if numbered and state_nimg(numbered[-1]) >= state_nimg(rolling):
        return numbered[-1]
    return rolling

def find_state(resume=None, outdir=None, in_place=False):
    """The state file a run resumes from, None = start afresh: the newest in `resume` when it is a
    folder, `resume` itself otherwise; without `resume`, the newest in `outdir` if `in_place`."""
    if in_place and outdir is not None and resume is None:
        found = latest_state(outdir) # reads the states' progress: once
        if found is not None:
            return found
    if resume is not None and os.path.isdir(resume):
        found = latest_state(resume)
        if found is None:
            raise RunDirError('no-state', Opt('resume', resume), ': no training-state-*.pt in that directory')
        return found
    if resume is not None and not dnnlib.util.is_url(resume) and not os.path.exists(resume):
        raise RunDirError('missing', Opt('resume', resume), ': no such run folder or state file' + _nearby_runs(resume))
    return resume

def _nearby_runs(path):
    # A typo in a run folder's name: list the run folders beside it, which is what the user meant.
    parent = os.path.dirname(os.path.normpath(path)) or '.'
    runs = sorted(d for d in os.listdir(parent) if os.path.isdir(os.path.join(parent, d))) if os.path.isdir(parent) else []
    if not runs:
        return f'; check the path ({parent} {"holds no folders" if os.path.isdir(parent) else "does not exist"})'
    shown = ', '.join(runs[-5:]) + (f' and {len(runs) - 5} more' if len(runs) > 5 else '')
    return f'; check the path: {parent} holds {shown}'

#----------------------------------------------------------------------------
# Recorded options: which continue a run.

def comparable(name, value):
    """An option's value as recorded and compared: paths made absolute."""
    return os.path.abspath(value) if name in ('data', 'outdir') and value is not None else value

def options_record(opts):
    """The options as recorded in the run folder (under 'command_line')."""
    return {name: comparable(name, value) for name, value in opts.items() if name not in PER_INVOCATION}

def recorded_options(state):
    """The command-line options recorded in the run folder of a state file; None for run folders
    of older versions and of EDM, whose training_options.json holds only the loop's arguments."""
    try:
        with open(os.path.join(os.path.dirname(state), OPTIONS_FILE)) as f:
            return json.load(f).get('command_line')
    except (OSError, ValueError, AttributeError):
        return None

def _images(interface):
    r, c, n = (interface.get(attr) for attr in INTERFACE)
    return f'{r}x{r}x{c} images, ' + (f'{n} classes' if n else 'no labels')

def _data_note(state, data):
    # Another dataset is most often another resolution or labelling: say what each has, from the
    # state file (which records it) and the dataset's own header. Nothing when either cannot be read.
    try:
        was = state_interface(load_training_state(state))
        now = ImageFolderDataset(path=data, use_labels=True).interface
    except (OSError, ValueError, KeyError, RuntimeError, pickle.UnpicklingError):
        return ''
    if not was or was == now:
        return ''
    return f': it trained on {_images(was)}, the new data has {_images(now)}'

def continue_options(opts, given, state):
    """(options, folder to continue in, None = a new one) for a run given `opts`, of which the names in
    `given` were given explicitly, resuming from `state` (None = afresh). A state whose run folder
    records its options continues there with them: options given explicitly must agree (every
    difference is named at once), except a longer duration and the options of WATCHING."""
    recorded = recorded_options(state) if state is not None else None
    if recorded is None:
        if opts['data'] is None or opts['outdir'] is None:
            if state is not None:
                old = ': its folder records no options (an older train.py\'s or EDM\'s run); give them again, at least '
                raise RunDirError('no-options', Opt('resume', opts['resume']), old, Opt('data'), ' and ', Opt('outdir'),
                                  f' (its {OPTIONS_FILE} lists them)')
            raise RunDirError('no-options', Opt('data'), ' and ', Opt('outdir'),
                              ' are needed to start a run; or continue one with ', Opt('resume', 'RUN_DIR'))
        return dnnlib.EasyDict(opts, resume=state), None
    differ = []
    for name in sorted(given & recorded.keys()):
        if (name == 'duration' and opts['duration'] >= recorded['duration']) or name in WATCHING:
            continue # training on for longer, or watching it otherwise: allowed
        if comparable(name, opts[name]) != comparable(name, recorded[name]):
            note = _data_note(state, opts[name]) if name == 'data' else ''
            differ += [', ' if differ else '', Opt(name, opts[name]), f' (the run has {recorded[name]}{note})']
    if differ:
        may_change = ['only a longer ', Opt('duration'), ', ', Opt('dump_minutes'), ' and the ', Opt('metric_*'),
                      ' options may change']
        continues = f'{state} continues its run with the options recorded in its folder; these differ: '
        raise RunDirError('options-differ', continues, *differ, '. Leave them out (', *may_change,
                          '), or start a new run, e.g. with ', Opt('transfer', '<network-snapshot>'), '.')
    keep = {name: value for name, value in recorded.items() if name in opts and name not in given}
    return dnnlib.EasyDict(opts, **keep, resume=state), os.path.dirname(state)

#----------------------------------------------------------------------------
# The folder itself.

def next_run_dir(outdir, desc):
    """A new numbered run folder in outdir: NNNNN-desc, one above the highest there."""
    prev_run_dirs = []
    if os.path.isdir(outdir):
        prev_run_dirs = [x for x in os.listdir(outdir) if os.path.isdir(os.path.join(outdir, x))]
    prev_run_ids = [re.match(r'^\d+', x) for x in prev_run_dirs]
    prev_run_ids = [int(x.group()) for x in prev_run_ids if x is not None]
    path = os.path.join(outdir, f'{max(prev_run_ids, default=-1) + 1:05d}-{desc}')
    assert not os.path.exists(path)
    return path

def write_options(run_dir, c, command_line):
    """training_options.json: the loop's arguments, and the options a resume from the folder takes."""
    with dnnlib.util.atomic_write(os.path.join(run_dir, OPTIONS_FILE)) as tmp, open(tmp, 'wt') as f:
        json.dump(dict(c, command_line=command_line), f, indent=2)

#----------------------------------------------------------------------------
# Do these weights fit this network?

def planned_network(network_kwargs, interface_kwargs):
    """The network a run will build, on the meta device: names and shapes, no memory, no time."""
    with torch.device('meta'):
        return dnnlib.util.construct_class_by_name(**network_kwargs, **interface_kwargs)

def state_interface(state):
    """Resolution, channels and classes of the network in one of our training states: recorded in
    it, or read off the tensors in older ones (the first encoder convolution is named by resolution)."""
    if 'img_resolution' in state:
        return {attr: state[attr] for attr in INTERFACE}
    for name, tensor in state['net'].items():
        match = re.fullmatch(r'model\.enc\.(\d+)x\d+_conv\.weight', name)
        if match:
            label = state['net'].get('model.map_label.weight')
            return dict(img_resolution=int(match.group(1)), img_channels=tensor.shape[1],
                        label_dim=0 if label is None else label.shape[1])
    return {}

def misfit(src, dst, source, strict, interface=None):
    """Why the weights of src (a network, or a state_dict with the interface it was trained for)
    do not fit the network dst, as RunDirError text (source names src); [] when they fit. strict
    (resume): every tensor must match. Otherwise (transfer) tensors that src lacks only in dst's
    augmentation-label layer may start from scratch, as EDM allows."""
    said = []
    if isinstance(src, torch.nn.Module):
        interface = {attr: getattr(src, attr, None) for attr in INTERFACE}
    aspects = [('img_resolution', 'resolution', lambda r: f'{r}x{r}', Opt('data')),
               ('img_channels', 'image channels', str, Opt('data')),
               ('label_dim', 'classes', lambda n: str(n or 'none'), 'this run')]
    for attr, what, show, where in aspects:
        if (interface or {}).get(attr) is not None and interface[attr] != getattr(dst, attr):
            said.append([f'{what} {show(interface[attr])} in ', source, f', {show(getattr(dst, attr))} in ', where])
    if isinstance(src, torch.nn.Module):
        if type(src).__name__ != type(dst).__name__:
            ours = f', {type(dst).__name__} in this run ('
            said.append([f'preconditioning {type(src).__name__} in ', source, ours, Opt('precond'), ')'])
        # Constructor arguments that shape the tensors; json makes tuples and lists compare equal.
        src_kwargs, dst_kwargs = getattr(src, 'init_kwargs', {}), dst.init_kwargs
        for key in sorted(src_kwargs.keys() & dst_kwargs.keys() - {*INTERFACE, 'augment_dim', 'dropout', 'use_fp16'}):
            a, b = (json.dumps(kw[key], default=str) for kw in (src_kwargs, dst_kwargs))
            if a != b:
                said.append([f'architecture: {key}={a} in ', source, f', {b} in this run'])
        src = src.state_dict()
    if not said:
        have = {name: tuple(t.shape) for name, t in src.items()}
        want = {name: tuple(t.shape) for name, t in dst.state_dict().items()}
        may_lack = lambda name: not strict and name.startswith('model.map_augment.')
        bad = [name for name in want if have.get(name) != want[name] and not may_lack(name)]
        bad += [name for name in have if strict and name not in want]
        if bad:
            example = f'e.g. {bad[0]} {have.get(bad[0], "missing")} there, {want.get(bad[0], "missing")} in this run'
            said.append([f'architecture: {len(bad)} tensor(s) missing or of other shapes in ', source, f', {example}'])
    return said

def check_fits(src, dst, source, strict, fix, interface=None):
    """Raise RunDirError('misfit') with every reason of misfit() and the text `fix` (a list) after them."""
    said = misfit(src, dst, source, strict, interface)
    if said:
        reasons = [part for i, reason in enumerate(said) for part in (['; '] if i else []) + reason]
        raise RunDirError('misfit', source, ' does not fit this run: ', *reasons, '. ', *fix)

def load_network(path, source):
    """The network in a snapshot, or RunDirError('cannot-load') naming it as source."""
    try:
        return network_io.load_network(path, verbose=(dist.get_rank() == 0))
    except Exception as err: # a pickle can fail in any way
        raise RunDirError('cannot-load', source, f': cannot load the network: {dnnlib.util.one_line(err, named=False)}') from err

RESUME_FIX = [f'Resume with the options of the interrupted run (its {OPTIONS_FILE} lists them).']
TRANSFER_FIX = ['Transfer from a snapshot of data with the same resolution and classes, trained with the same ',
                Opt('arch'), ', ', Opt('cbase'), ', ', Opt('cres'), ' and ', Opt('precond'), '.']

def transfer_from(path, network_kwargs, interface):
    """The loop's arguments to start the network of these kwargs and interface from the weights of the
    snapshot at path, checked before the run folder exists (the loop would load whatever names match)."""
    source = Opt('transfer', path)
    if not dnnlib.util.is_url(path) and not os.path.isfile(path):
        raise RunDirError('no-file', source, ': no such file')
    src, dst = load_network(path, source), planned_network(network_kwargs, interface)
    check_fits(src, dst, source, strict=False, fix=TRANSFER_FIX)
    if {name for name in dst.state_dict() if name.startswith('model.map_augment.')} - set(src.state_dict()):
        dist.print0('Note: the snapshot has no augmentation-label layer; '
                    'this run starts that layer from random weights.')
    return dict(resume_pkl=path)

def resume_from(path, network_kwargs, interface, world_size, batch, aot, seed, nearest_of=0):
    """The loop's arguments to resume the network of these kwargs and interface from the state file
    at path (ours or EDM's mid-run dump, whose EMA weights are in the snapshot beside it), after
    checking that the state continues a run of these pool options (seed None = the state's) and
    that its weights fit that network."""
    source = Opt('resume', path)
    match = re.fullmatch(r'training-state-(\d+|latest)\.pt', os.path.basename(path))
    if not match or not os.path.isfile(path):
        expected = ': expected an existing training-state-NNNNNN.pt or -latest.pt file or a run directory'
        raise RunDirError('not-a-state', source, expected)
    try:
        state = load_training_state(path)
    except Exception as err: # torch raises many types for a damaged file
        raise RunDirError('not-a-state', source, f': cannot read training state ({type(err).__name__}); '
                          'the file is damaged or not a training state') from err
    if not isinstance(state, dict) or not {'net', 'optimizer_state'} <= state.keys():
        raise RunDirError('not-a-state', source, ': not a training state (it holds no network and optimizer state)')
    dst = planned_network(network_kwargs, interface)
    plan = {}
    if state.get('format') == STATE_FORMAT:
        for option, value in dict(batch=batch, aot=aot, nearest_of=nearest_of, seed=seed).items():
            key = POOL_OPTIONS[option]
            if value is not None and key in state and state[key] != value:
                had, this = Opt(option, state[key]), Opt(option, value)
                raise RunDirError('pools-differ', source, ': the interrupted run had ', had, ', this one ', this,
                                  '; the pools follow from it. Resume with ', had,
                                  ', or start a new run from its weights with ', Opt('transfer', '<network-snapshot>'), '.')
        if state.get('world_size', world_size) != world_size:
            counts = f'the interrupted run had {state["world_size"]} GPU(s), this one {world_size}'
            rebuilt = f'pools are rebuilt for {world_size} rank(s) from image {state["cur_nimg"]} on'
            dist.print0(f'Note: {counts}: {rebuilt}, so training continues but not as the uninterrupted run would have.')
        check_fits(state['net'], dst, source, strict=True, fix=RESUME_FIX, interface=state_interface(state))
        if seed is None:
            plan['seed'] = state['seed'] # the pools and the random streams continue as before
    elif match.group(1) == 'latest':
        foreign = f': not a training state of this train.py (format {state.get("format")!r})'
        raise RunDirError('not-a-state', source, foreign)
    else: # EDM's state dump: the EMA weights live in the snapshot pickle next to it
        pkl = os.path.join(os.path.dirname(path), f'network-snapshot-{match.group(1)}.pkl')
        if not os.path.isfile(pkl):
            raise RunDirError('no-file', source, f': EDM state dumps need {pkl} next to them')
        check_fits(state['net'], dst, source, strict=True, fix=RESUME_FIX)
        check_fits(load_network(pkl, pkl), dst, pkl, strict=True, fix=RESUME_FIX)
        plan.update(resume_pkl=pkl, resume_kimg=int(match.group(1)))
    plan['resume_state_dump'] = path
    return plan
