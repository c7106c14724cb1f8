"""The run folder's rules (training/run_dir.py), in this process: the newest state, which options
continue a run, whether weights fit the network, and the refusals, whose text names options by key
(a program names its flags through RunDirError.message)."""

import functools
import json
import os

import pytest
import torch

import dnnlib
from training import run_dir
from training.run_dir import RunDirError

INTERFACE = dict(img_resolution=8, img_channels=3, label_dim=4)
NETWORK = dict(class_name='training.networks.EDMPrecond', model_type='SongUNet', embedding_type='positional',
               encoder_type='standard', decoder_type='standard', channel_mult_noise=1, resample_filter=[1, 1],
               model_channels=8, channel_mult=[1, 1], augment_dim=9, dropout=0.1, use_fp16=False)

def flag(option, value=run_dir.Opt.NONE):
    return f'--{option}' if value is run_dir.Opt.NONE else f'--{option}={value}'

def refusal(fn, *args, **kwargs):
    """The RunDirError fn raises; its plain text names no flag."""
    with pytest.raises(RunDirError) as info:
        fn(*args, **kwargs)
    assert '--' not in str(info.value), str(info.value)
    return info.value

@functools.lru_cache(maxsize=None) # tiny networks, built once each: the module's tests stay fast
def cached_network(changes):
    return build_network(**dict(changes))

def network(**changes):
    return cached_network(tuple(sorted(changes.items())))

def build_network(**changes):
    interface = {**INTERFACE, **{k: v for k, v in changes.items() if k in INTERFACE}}
    kwargs = {**NETWORK, **{k: v for k, v in changes.items() if k not in INTERFACE}}
    torch.manual_seed(0)
    return dnnlib.util.construct_class_by_name(**kwargs, **interface)

#----------------------------------------------------------------------------
# The newest state.

def test_find_state(tmp_path):
    torch.save(dict(cur_nimg=64), tmp_path / 'training-state-000000.pt')
    torch.save(dict(cur_nimg=128), tmp_path / 'training-state-latest.pt')
    newest = str(tmp_path / 'training-state-latest.pt')
    assert run_dir.find_state(outdir=str(tmp_path), in_place=True) == newest
    assert run_dir.find_state(outdir=str(tmp_path)) is None # not in place: a new run
    assert run_dir.find_state(resume=str(tmp_path)) == newest
    (tmp_path / 'training-state-000004.pt').write_bytes(b'')
    assert run_dir.find_state(resume=str(tmp_path / 'training-state-000004.pt')) == str(tmp_path / 'training-state-000004.pt')
    # A typo: the folder does not exist; the message says so and lists the folders beside it.
    (tmp_path / '00000-digits').mkdir()
    err = refusal(run_dir.find_state, resume=str(tmp_path / '00000-digit'))
    assert err.kind == 'missing'
    assert err.message(flag) == f'--resume={tmp_path / "00000-digit"}: no such run folder or state file; check the path: {tmp_path} holds 00000-digits'
    err = refusal(run_dir.find_state, resume=str(tmp_path / 'nowhere' / 'run'))
    assert err.message(flag).endswith(f'; check the path ({tmp_path / "nowhere"} does not exist)')
    (tmp_path / 'empty').mkdir()
    assert run_dir.find_state(outdir=str(tmp_path / 'empty'), in_place=True) is None
    err = refusal(run_dir.find_state, resume=str(tmp_path / 'empty'))
    assert err.kind == 'no-state'
    assert err.message(flag) == f'--resume={tmp_path / "empty"}: no training-state-*.pt in that directory'

def test_state_nimg_of_edm_and_damaged_states(tmp_path):
    (tmp_path / 'training-state-000003.pt').write_bytes(b'EDM pickles code')
    (tmp_path / 'other.pt').write_bytes(b'')
    assert run_dir.state_nimg(str(tmp_path / 'training-state-000003.pt')) == 3000
    assert run_dir.state_nimg(str(tmp_path / 'other.pt')) == -1

#----------------------------------------------------------------------------
# Which options continue a run.

OPTIONS = dict(data='data.zip', outdir='runs', duration=1.0, batch=64, aot=256, seed=0, metric_every=0, dump_minutes=30,
               transfer=None, resume=None, dry_run=False)

@pytest.fixture
def recorded_run(tmp_path, monkeypatch):
    """A run folder with its options recorded as train.py records them, and a state in it."""
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / 'runs' / '00000-run'
    folder.mkdir(parents=True)
    record = run_dir.options_record(OPTIONS)
    assert 'resume' not in record and 'dry_run' not in record and record['data'] == str(tmp_path / 'data.zip')
    run_dir.write_options(str(folder), dict(total_kimg=1000), record)
    state = str(folder / 'training-state-000001.pt')
    torch.save(dict(cur_nimg=1000), state)
    return state

def given(**opts):
    """Options as a new invocation gives them: defaults, except those named (and given)."""
    return dnnlib.EasyDict({**{k: None for k in OPTIONS}, 'dry_run': False, **opts}), set(opts)

def test_options_continue_the_recorded_run(recorded_run):
    opts, names = given(resume=os.path.dirname(recorded_run))
    out, folder = run_dir.continue_options(opts, names, recorded_run)
    assert folder == os.path.dirname(recorded_run)
    assert out.resume == recorded_run and out.aot == 256 and out.duration == 1.0 and out.dry_run is False
    assert json.load(open(os.path.join(folder, run_dir.OPTIONS_FILE)))['total_kimg'] == 1000

def test_options_that_may_change(recorded_run):
    # A longer duration, the watching options, and the same values (relative paths too).
    opts, names = given(duration=2.0, metric_every=5, dump_minutes=1, data='data.zip', aot=256)
    out, _ = run_dir.continue_options(opts, names, recorded_run)
    assert (out.duration, out.metric_every, out.dump_minutes, out.batch) == (2.0, 5, 1, 64)

def test_options_that_differ_are_all_named(recorded_run):
    opts, names = given(duration=0.5, aot=128, batch=32, data='other.zip', seed=0)
    err = refusal(run_dir.continue_options, opts, names, recorded_run)
    assert err.kind == 'options-differ'
    text = err.message(flag)
    for difference in ['--aot=128 (the run has 256)', '--batch=32 (the run has 64)', '--duration=0.5 (the run has 1.0)',
                       '--data=other.zip (the run has ']:
        assert difference in text
    assert '--seed' not in text.split('Leave them out')[0]
    assert text.startswith(f'{recorded_run} continues its run') and 'only a longer --duration, --dump_minutes' in text

def test_run_without_recorded_options(tmp_path):
    state = str(tmp_path / 'training-state-000001.pt')
    opts, names = given(data='d.zip', outdir='runs', aot=8)
    out, folder = run_dir.continue_options(opts, names, state) # nothing recorded: the options as given
    assert folder is None and out.resume == state and out.aot == 8
    opts, names = given(resume=str(tmp_path))
    err = refusal(run_dir.continue_options, opts, names, state)
    assert err.kind == 'no-options'
    assert err.message(flag).startswith(f'--resume={tmp_path}: its folder records no options')
    assert 'at least --data and --outdir' in err.message(flag)
    err = refusal(run_dir.continue_options, *given(outdir='runs'), None)
    assert err.message(flag) == '--data and --outdir are needed to start a run; or continue one with --resume=RUN_DIR'

def test_next_run_dir(tmp_path):
    assert run_dir.next_run_dir(str(tmp_path / 'none'), 'x') == str(tmp_path / 'none' / '00000-x')
    for name in ['00003-a', '00007-b', 'notes']:
        (tmp_path / name).mkdir()
    (tmp_path / '00009-file').write_text('')
    assert run_dir.next_run_dir(str(tmp_path), 'c') == str(tmp_path / '00008-c')

#----------------------------------------------------------------------------
# Do these weights fit this network?

def reasons(src, dst, strict, interface=None):
    return [''.join(p if isinstance(p, str) else p.name(flag) for p in reason)
            for reason in run_dir.misfit(src, dst, 'SRC', strict, interface)]

def test_weights_fit():
    dst = run_dir.planned_network(NETWORK, INTERFACE)
    assert reasons(network(), dst, strict=True) == []
    assert reasons(network().state_dict(), dst, strict=True, interface=INTERFACE) == []

@pytest.mark.parametrize('precond', ['VP', 'VE', 'EDM', 'iDDPM'])
def test_planned_network_of_every_precond(precond):
    # Built on the meta device, where VP's and iDDPM's constructors once crashed on float() of a
    # meta tensor; their constants are still EDM's, computed on the CPU.
    real = network(class_name=f'training.networks.{precond}Precond')
    planned = run_dir.planned_network(dict(NETWORK, class_name=f'training.networks.{precond}Precond'), INTERFACE)
    assert next(planned.parameters()).is_meta
    assert (planned.sigma_min, planned.sigma_max) == (real.sigma_min, real.sigma_max)
    if precond == 'iDDPM':
        assert torch.equal(planned.u, real.u)
    assert reasons(real, planned, strict=True) == []

def test_weights_that_do_not_fit_say_why():
    dst = run_dir.planned_network(NETWORK, INTERFACE)
    assert reasons(network(img_resolution=16), dst, strict=False) == ['resolution 16x16 in SRC, 8x8 in --data']
    assert reasons(network(label_dim=0), dst, strict=False) == ['classes none in SRC, 4 in this run']
    assert reasons(network(class_name='training.networks.VPPrecond'), dst, strict=False) == \
        ['preconditioning VPPrecond in SRC, EDMPrecond in this run (--precond)']
    assert reasons(network(model_channels=16), dst, strict=False) == \
        ['architecture: model_channels=16 in SRC, 8 in this run']
    # Dropout and fp16 shape no tensor: they may differ.
    assert reasons(network(dropout=0, use_fp16=True), dst, strict=True) == []

def test_augmentation_layer_may_start_afresh_only_on_transfer():
    dst = run_dir.planned_network(NETWORK, INTERFACE)
    weights = {k: v for k, v in network().state_dict().items() if not k.startswith('model.map_augment.')}
    assert reasons(weights, dst, strict=False, interface=INTERFACE) == []
    [why] = reasons(weights, dst, strict=True, interface=INTERFACE)
    assert why.startswith('architecture: 1 tensor(s) missing or of other shapes in SRC, '
                          'e.g. model.map_augment.weight missing there')
    extra = dict(network().state_dict(), unknown=torch.zeros(1))
    assert reasons(extra, dst, strict=True, interface=INTERFACE)[0].startswith('architecture: 1 tensor(s)')

def test_state_interface_of_older_states():
    state = dict(net=network().state_dict())
    assert run_dir.state_interface(state) == INTERFACE
    assert run_dir.state_interface(dict(state, **{**INTERFACE, 'img_channels': 1}))['img_channels'] == 1

#----------------------------------------------------------------------------
# Resume and transfer: what the loop gets, and what is refused.

def our_state(path, **changes):
    net = network()
    state = dict(format=run_dir.STATE_FORMAT, net=net.state_dict(), ema=net.state_dict(),
                 optimizer_state=torch.optim.Adam(net.parameters()).state_dict(), seed=7, cur_nimg=1000, cur_tick=1,
                 batch_size=64, aot_pool=256, nearest_of=0, world_size=1, **INTERFACE)
    torch.save(dict(state, **changes), path)
    return str(path)

def test_resume_from_our_state(tmp_path):
    path = our_state(tmp_path / 'training-state-000001.pt')
    resume = lambda seed: run_dir.resume_from(path, NETWORK, INTERFACE, 1, batch=64, aot=256, seed=seed)
    assert resume(None) == dict(seed=7, resume_state_dump=path)
    assert resume(7) == dict(resume_state_dump=path)

@pytest.mark.parametrize('option,value,run_has', [('batch', 32, 64), ('aot', 128, 256), ('nearest_of', 4, 0), ('seed', 1, 7)])
def test_resume_refuses_other_pools(tmp_path, option, value, run_has):
    path = our_state(tmp_path / 'training-state-000001.pt')
    pools_from = {**dict(batch=64, aot=256, nearest_of=0, seed=None), option: value}
    err = refusal(run_dir.resume_from, path, NETWORK, INTERFACE, 1, **pools_from)
    assert err.kind == 'pools-differ'
    had = f'the interrupted run had --{option}={run_has}, this one --{option}={value}'
    assert err.message(flag).startswith(f'--resume={path}: {had}')

def test_resume_refuses_what_is_not_a_state(tmp_path):
    (tmp_path / 'training-state-000001.pt').write_bytes(b'damaged')
    torch.save(dict(net={}), tmp_path / 'training-state-000002.pt')
    torch.save(dict(net={}, optimizer_state={}), tmp_path / 'training-state-latest.pt')
    our_state(tmp_path / 'state.pt')
    for name, words in [('state.pt', 'expected an existing training-state-NNNNNN.pt'),
                        ('training-state-000009.pt', 'expected an existing'),
                        ('training-state-000001.pt', 'cannot read training state'),
                        ('training-state-000002.pt', 'not a training state (it holds'),
                        ('training-state-latest.pt', 'not a training state of this train.py')]:
        err = refusal(run_dir.resume_from, str(tmp_path / name), NETWORK, INTERFACE, 1, batch=64, aot=256, seed=None)
        assert err.message(flag).startswith(f'--resume={tmp_path / name}: {words}'), err.message(flag)

def test_resume_refuses_a_state_of_another_network(tmp_path):
    path = our_state(tmp_path / 'training-state-000001.pt')
    err = refusal(run_dir.resume_from, path, dict(NETWORK, model_channels=16), INTERFACE, 1, batch=64, aot=256, seed=None)
    assert err.kind == 'misfit'
    assert err.message(flag).startswith(f'--resume={path} does not fit this run: architecture: ')

def test_edm_state_dump_needs_its_snapshot(tmp_path):
    net = network()
    optimizer_state = torch.optim.Adam(net.parameters()).state_dict()
    torch.save(dict(net=net, optimizer_state=optimizer_state), tmp_path / 'training-state-000002.pt')
    path = str(tmp_path / 'training-state-000002.pt')
    err = refusal(run_dir.resume_from, path, NETWORK, INTERFACE, 1, batch=64, aot=256, seed=None)
    assert err.kind == 'no-file' and 'EDM state dumps need' in str(err) and 'network-snapshot-000002.pkl' in str(err)

def test_transfer_refusals(tmp_path):
    err = refusal(run_dir.transfer_from, str(tmp_path / 'nope.pkl'), NETWORK, INTERFACE)
    assert err.message(flag) == f'--transfer={tmp_path / "nope.pkl"}: no such file'
    (tmp_path / 'bad.pkl').write_bytes(b'not a pickle')
    err = refusal(run_dir.transfer_from, str(tmp_path / 'bad.pkl'), NETWORK, INTERFACE)
    assert err.kind == 'cannot-load'
    assert err.message(flag).startswith(f'--transfer={tmp_path / "bad.pkl"}: cannot load the network: ')
