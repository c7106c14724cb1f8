"""torch_utils.persistence: pickles carry their module's source and load without it (EDM's format)."""

import importlib.util
import io
import os
import pickle
import pickletools
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import dnnlib
from torch_utils import persistence
from tests.helpers import python_with_only

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A module in EDM's style: its source imports torch_utils.persistence and torch_utils.misc.
MODULE_SRC = textwrap.dedent('''
    import torch
    from torch_utils import persistence
    from torch_utils import misc

    @persistence.persistent_class
    class Scale(torch.nn.Module):
        def __init__(self, channels):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.linspace(0.5, 1.5, channels))
        def forward(self, x):
            return x * self.weight

    @persistence.persistent_class
    class TinyNet(torch.nn.Module):
        def __init__(self, in_channels, out_channels, gain=1.0, kwargs_dict=None):
            super().__init__()
            self.gain = gain
            self.fc = torch.nn.Linear(in_channels, out_channels)
            self.scale = Scale(out_channels)
            self.register_buffer('offset', torch.arange(out_channels, dtype=torch.float32))
        def forward(self, x):
            misc.assert_shape(x, [None, self.fc.in_features])
            return self.scale(self.fc(x)) * misc.constant(self.gain) + self.offset

    @persistence.persistent_class
    class Plain:
        def __init__(self, p=0.5):
            self.p = float(p)
''')

def _import_tiny(tmp_path, name='tiny_module', src=MODULE_SRC):
    path = tmp_path / f'{name}.py'
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module

def _isolated_site(tmp_path):
    """A directory with only dnnlib and torch_utils: in it, `training` cannot be imported."""
    site = tmp_path / 'site'
    for pkg in ('dnnlib', 'torch_utils'):
        shutil.copytree(os.path.join(REPO, pkg), site / pkg, ignore=shutil.ignore_patterns('__pycache__'))
    return site

def _run_fresh(site, code, cwd):
    python, env = python_with_only(site)
    proc = subprocess.run([*python, '-c', code], cwd=str(cwd), env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout

def _recorded_globals(data):
    """(module, name) of every global a pickle refers to, read from its opcodes without loading it."""
    found, strings = [], []
    for op, arg, _ in pickletools.genops(data):
        if op.name in ('SHORT_BINUNICODE', 'BINUNICODE', 'UNICODE'):
            strings.append(arg)
        elif op.name == 'STACK_GLOBAL':
            found.append((strings[-2], strings[-1]))
        elif op.name == 'GLOBAL':
            found.append(tuple(arg.split(' ', 1)))
    return found

#----------------------------------------------------------------------------

def test_pickle_format_is_edms(tmp_path):
    mod = _import_tiny(tmp_path, 'tiny_format')
    net = mod.TinyNet(3, 4, gain=2.0, kwargs_dict=dnnlib.EasyDict(a=1))
    assert persistence.is_persistent(net) and persistence.is_persistent(mod.TinyNet) and not persistence.is_persistent(torch.nn.Linear)
    assert net.init_args == (3, 4) and net.init_kwargs == dict(gain=2.0, kwargs_dict=dict(a=1))
    assert isinstance(net.init_kwargs, dnnlib.EasyDict)
    data = pickle.dumps(net)
    refs = _recorded_globals(data)
    assert ('torch_utils.persistence', '_reconstruct_persistent_obj') in refs
    assert ('dnnlib.util', 'EasyDict') in refs
    assert not any(m.startswith('tiny_format') for m, _ in refs) # the module itself is not referenced by name

    # The reconstruct call receives EDM's meta: exactly these fields, version 6.
    metas = []
    class Spy(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) == ('torch_utils.persistence', '_reconstruct_persistent_obj'):
                return lambda meta: metas.append(meta) or persistence._reconstruct_persistent_obj(meta)
            return super().find_class(module, name)
    Spy(io.BytesIO(data)).load()
    assert {m['class_name'] for m in metas} == {'TinyNet', 'Scale'}
    for meta in metas:
        assert set(meta.keys()) == {'type', 'version', 'module_src', 'class_name', 'state'}
        assert meta['type'] == 'class' and meta['version'] == 6 and meta['module_src'] == MODULE_SRC

@pytest.mark.slow
def test_roundtrip_in_fresh_interpreter_without_source(tmp_path):
    mod = _import_tiny(tmp_path, 'tiny_gone')
    torch.manual_seed(0)
    net = mod.TinyNet(3, 4, gain=2.0)
    x = torch.randn(5, 3)
    torch.save(dict(x=x, y=net(x).detach()), tmp_path / 'ref.pt')
    with open(tmp_path / 'snap.pkl', 'wb') as f:
        pickle.dump(dict(ema=net, augment_pipe=mod.Plain(p=0.25), dataset_kwargs=dnnlib.EasyDict(path='x.zip')), f)
    os.remove(tmp_path / 'tiny_gone.py') # the defining source no longer exists anywhere
    site = _isolated_site(tmp_path)
    out = _run_fresh(site, textwrap.dedent(f'''
        import pickle, importlib.util, torch
        assert importlib.util.find_spec('training') is None, 'training must not be importable here'
        assert importlib.util.find_spec('tiny_gone') is None
        with open({str(tmp_path / 'snap.pkl')!r}, 'rb') as f:
            snap = pickle.load(f)
        net, ref = snap['ema'], torch.load({str(tmp_path / 'ref.pt')!r})
        assert type(net).__module__.startswith('_imported_module_'), type(net).__module__
        assert type(net).__name__ == 'TinyNet' and net.init_args == (3, 4) and net.init_kwargs == dict(gain=2.0)
        assert torch.equal(net(ref['x']), ref['y'])
        assert snap['augment_pipe'].p == 0.25 and snap['dataset_kwargs'].path == 'x.zip'
        # Re-pickling an unpickled object keeps working (EDM resumes from its own snapshots).
        again = pickle.loads(pickle.dumps(net))
        assert torch.equal(again(ref['x']), ref['y'])
        print('ok')
    '''), cwd=tmp_path)
    assert out.strip() == 'ok'

@pytest.mark.slow
def test_pickled_source_wins_over_changed_source(tmp_path):
    mod = _import_tiny(tmp_path, 'tiny_changed')
    net = mod.TinyNet(2, 2)
    x = torch.ones(1, 2)
    y = net(x).detach()
    data = pickle.dumps(net)
    # The module on disk changes behaviour; the pickle still computes with the code it was saved with.
    (tmp_path / 'tiny_changed.py').write_text(MODULE_SRC.replace('* misc.constant(self.gain)', '* 100'))
    site = _isolated_site(tmp_path)
    (tmp_path / 'data.pkl').write_bytes(data)
    torch.save(dict(x=x, y=y), tmp_path / 'ref.pt')
    out = _run_fresh(site, textwrap.dedent('''
        import pickle, sys, torch
        import tiny_changed
        net = pickle.load(open('data.pkl', 'rb'))
        ref = torch.load('ref.pt')
        assert torch.equal(net(ref['x']), ref['y'])
        fresh = tiny_changed.TinyNet(2, 2)
        fresh.load_state_dict(net.state_dict())
        assert not torch.equal(fresh(ref['x']), ref['y']) # the new code really is different
        print('ok')
    '''), cwd=tmp_path)
    assert out.strip() == 'ok'

class _EDMStylePickle:
    """Pickles exactly as an EDM-written file does: a call of the reconstruct function by name."""
    def __init__(self, meta):
        self.meta = meta
    def __reduce__(self):
        return (persistence._reconstruct_persistent_obj, (self.meta,))

# nn.Module attributes of torch 1.12, which EDM's published pickles were written with; newer ones
# (e.g. _forward_hooks_with_kwargs) are missing from such files and must be filled in on loading.
TORCH_1_12_MODULE_KEYS = {'training', '_parameters', '_buffers', '_non_persistent_buffers_set', '_backward_hooks',
    '_is_full_backward_hook', '_forward_hooks', '_forward_pre_hooks', '_state_dict_hooks', '_load_state_dict_pre_hooks', '_modules'}

@pytest.mark.slow
@pytest.mark.parametrize('meta_type,old_torch', [(dict, False), (dnnlib.EasyDict, False), (dict, True)])
def test_hand_built_edm_pickle_loads(tmp_path, meta_type, old_torch):
    # Take the state of a TinyNet built from the source (in a throwaway module); pickle only its state.
    scratch = persistence._src_to_module(MODULE_SRC)
    torch.manual_seed(1)
    src_net = scratch.TinyNet(3, 2, gain=0.5)
    x = torch.randn(4, 3)
    y = src_net(x).detach()
    def meta_of(obj, class_name):
        state = dict(obj.__dict__)
        if old_torch:
            state = {k: v for k, v in state.items() if not k.startswith('_') or k in TORCH_1_12_MODULE_KEYS or k.startswith('_init_')}
        state['_modules'] = {k: _EDMStylePickle(meta_of(v, type(v).__name__)) if persistence.is_persistent(v) else v
            for k, v in state['_modules'].items()}
        return meta_type(type='class', version=6, module_src=MODULE_SRC, class_name=class_name, state=state)
    data = pickle.dumps(dict(ema=_EDMStylePickle(meta_of(src_net, 'TinyNet')), loss_fn=None), protocol=2)
    assert ('torch_utils.persistence', '_reconstruct_persistent_obj') in _recorded_globals(data)
    (tmp_path / 'edm.pkl').write_bytes(data)
    torch.save(dict(x=x, y=y), tmp_path / 'ref.pt')
    out = _run_fresh(_isolated_site(tmp_path), textwrap.dedent('''
        import pickle, torch
        from torch_utils import persistence
        net = pickle.load(open('edm.pkl', 'rb'))['ema']
        ref = torch.load('ref.pt')
        assert persistence.is_persistent(net) and persistence.is_persistent(net.scale)
        assert net.init_kwargs == dict(gain=0.5)
        assert torch.equal(net(ref['x']), ref['y'])
        print('ok')
    '''), cwd=tmp_path)
    assert out.strip() == 'ok'

@pytest.mark.slow
def test_import_hook_and_version_check(tmp_path):
    mod = _import_tiny(tmp_path, 'tiny_hook')
    data = pickle.dumps(mod.Plain(p=0.5))
    site = _isolated_site(tmp_path)
    (tmp_path / 'p.pkl').write_bytes(data)
    out = _run_fresh(site, textwrap.dedent('''
        import pickle
        from torch_utils import persistence
        seen = []
        @persistence.import_hook
        def patch(meta):
            seen.append((meta.type, meta.version, meta.class_name))
            meta.module_src = meta.module_src.replace('self.p = float(p)', 'self.p = float(p) * 4')
            meta.state.patched = True
            return meta
        obj = pickle.load(open('p.pkl', 'rb'))
        assert seen == [('class', 6, 'Plain')], seen
        assert obj.patched and obj.p == 0.5 # state is restored as saved; the constructor does not run
        assert obj.__class__(p=1).p == 4.0 # but the class comes from the patched source
        persistence._import_hooks.clear()
        @persistence.import_hook
        def future(meta):
            meta.version = 7
            return meta
        try:
            pickle.load(open('p.pkl', 'rb'))
        except pickle.UnpicklingError as err:
            assert 'version 7' in str(err)
            print('ok')
    '''), cwd=tmp_path)
    assert out.strip() == 'ok'

def test_unpicklable_member_fails_at_construction(tmp_path):
    src = MODULE_SRC + textwrap.dedent('''
        @persistence.persistent_class
        class HoldsLambda:
            def __init__(self):
                self.fn = lambda x: x
    ''')
    mod = _import_tiny(tmp_path, 'tiny_lambda', src)
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        mod.HoldsLambda()

#----------------------------------------------------------------------------
