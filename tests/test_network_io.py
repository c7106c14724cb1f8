"""training/network_io.py and tools/convert_network.py: EDM snapshot pickles and the safe format."""

import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from training import network_io
from tests.helpers import python_with_only

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(REPO, 'tests', 'golden', 'networks')

SMALL_SRC = textwrap.dedent('''
    import torch
    from torch_utils import persistence

    @persistence.persistent_class
    class SmallNet(torch.nn.Module):
        def __init__(self, channels, hidden=8, act='silu'):
            super().__init__()
            self.act = act
            self.inp = torch.nn.Linear(channels, hidden)
            self.out = torch.nn.Linear(hidden, channels)
            self.register_buffer('shift', torch.linspace(-1, 1, channels))
        def forward(self, x, sigma):
            return self.out(getattr(torch.nn.functional, self.act)(self.inp(x))) * sigma + self.shift
''')

@pytest.fixture
def small_module(tmp_path, monkeypatch):
    pkg = tmp_path / 'smallpkg'
    pkg.mkdir()
    (pkg / '__init__.py').write_text('')
    (pkg / 'small.py').write_text(SMALL_SRC)
    monkeypatch.syspath_prepend(str(tmp_path))
    import smallpkg.small
    yield smallpkg.small

def _run(args, cwd, pythonpath=REPO, **kw):
    python, env = python_with_only(pythonpath)
    return subprocess.run([*python, *args[1:]], cwd=str(cwd), env=env, capture_output=True, text=True, timeout=180, **kw)

#----------------------------------------------------------------------------
# With a small persistent class of the test's own.

def test_safe_roundtrip_small(small_module, tmp_path):
    torch.manual_seed(0)
    net = small_module.SmallNet(4, hidden=6, act='tanh')
    path = str(tmp_path / 'net.safetensors')
    network_io.save_safe(net, path)
    assert os.listdir(tmp_path).count('net.safetensors') == 1 and not [f for f in os.listdir(tmp_path) if '.tmp' in f]
    # Readable like the .pkl beside it (safetensors itself writes 0600).
    open(tmp_path / 'net.pkl', 'wb').close()
    assert oct(os.stat(path).st_mode & 0o777) == oct(os.stat(tmp_path / 'net.pkl').st_mode & 0o777)
    header = network_io.read_safe_header(path)
    assert header == dict(format=network_io.SAFE_FORMAT, class_name='smallpkg.small.SmallNet', init_args=[4], init_kwargs=dict(hidden=6, act='tanh'))
    # The default trust list covers only this repository's training/ package.
    with pytest.raises(IOError, match='outside the trusted modules'):
        network_io.load_safe(path)
    loaded = network_io.load_safe(path, trusted_prefixes=('smallpkg.',))
    assert not loaded.training
    x = torch.randn(3, 4)
    assert torch.equal(loaded(x, 0.5), net(x, 0.5))

def test_load_network_pickles(small_module, tmp_path, capsys):
    net = small_module.SmallNet(2)
    with open(tmp_path / 'snap.pkl', 'wb') as f:
        pickle.dump(dict(ema=net, loss_fn=None, augment_pipe=None, dataset_kwargs={}), f)
    with open(tmp_path / 'bare.pkl', 'wb') as f:
        pickle.dump(net, f)
    x = torch.randn(2, 2)
    for name in ('snap.pkl', 'bare.pkl'):
        loaded = network_io.load_network(str(tmp_path / name))
        out = capsys.readouterr().out
        assert out.count('\n') == 1 and 'unpickling runs code' in out and 'tools/convert_network.py' in out
        assert not loaded.training and torch.equal(loaded(x, 1.0), net(x, 1.0))
    network_io.load_network(str(tmp_path / 'snap.pkl'), verbose=False)
    assert capsys.readouterr().out == ''

def test_run_folder_gives_its_newest_snapshot(small_module, tmp_path, capsys):
    run = tmp_path / 'run'
    run.mkdir()
    with pytest.raises(IOError, match='is a folder with no network-snapshot-'):
        network_io.load_network(str(run), verbose=False)
    nets = {kimg: (torch.manual_seed(kimg), small_module.SmallNet(2))[1] for kimg in (200, 1000)}
    for kimg, net in nets.items():
        with open(run / f'network-snapshot-{kimg:06d}.pkl', 'wb') as f:
            pickle.dump(dict(ema=net), f)
    (run / 'network-snapshot-000100.txt').write_text('not a snapshot') # other names are left alone
    x = torch.randn(2, 2)
    loaded = network_io.load_network(str(run))
    assert 'Newest snapshot in' in capsys.readouterr().out and torch.equal(loaded(x, 1.0), nets[1000](x, 1.0))
    network_io.save_safe(nets[1000], run / 'network-snapshot-001000.safetensors')
    assert network_io.newest_snapshot(str(run)) == str(run / 'network-snapshot-001000.safetensors') # the safe file of the two

def test_bad_files_give_clear_errors(small_module, tmp_path):
    good = tmp_path / 'good.pkl'
    with open(good, 'wb') as f:
        pickle.dump(dict(ema=small_module.SmallNet(2)), f)
    (tmp_path / 'truncated.pkl').write_bytes(good.read_bytes()[:200])
    with pytest.raises(IOError, match='Cannot unpickle .*truncated.pkl'):
        network_io.load_network(str(tmp_path / 'truncated.pkl'), verbose=False)
    with open(tmp_path / 'notnet.pkl', 'wb') as f:
        pickle.dump(dict(G_ema=1, D=2), f)
    with pytest.raises(IOError, match=r"keys \['D', 'G_ema'\], not a network"):
        network_io.load_network(str(tmp_path / 'notnet.pkl'), verbose=False)
    with pytest.raises(IOError, match='File not found'):
        network_io.load_network(str(tmp_path / 'missing.pkl'), verbose=False)

    # A corrupt safetensors file, one without our metadata, and one naming a non-repository callable.
    import safetensors.torch
    (tmp_path / 'corrupt.safetensors').write_bytes(b'\x10\x00\x00\x00\x00\x00\x00\x00{"a": garbage')
    with pytest.raises(IOError, match='corrupt'):
        network_io.load_network(str(tmp_path / 'corrupt.safetensors'), verbose=False)
    safetensors.torch.save_file({'w': torch.zeros(2)}, str(tmp_path / 'plain.safetensors'))
    with pytest.raises(IOError, match='without network metadata'):
        network_io.load_safe(str(tmp_path / 'plain.safetensors'))
    evil = dict(format=network_io.SAFE_FORMAT, class_name='os.system', init_args=['touch pwned'], init_kwargs={})
    safetensors.torch.save_file({'w': torch.zeros(2)}, str(tmp_path / 'evil.safetensors'), metadata={network_io.SAFE_METADATA_KEY: json.dumps(evil)})
    with pytest.raises(IOError, match='trusted'):
        network_io.load_safe(str(tmp_path / 'evil.safetensors'))
    evil['class_name'] = 'training.network_io.save_safe'
    safetensors.torch.save_file({'w': torch.zeros(2)}, str(tmp_path / 'evil2.safetensors'), metadata={network_io.SAFE_METADATA_KEY: json.dumps(evil)})
    with pytest.raises(IOError, match='not a network class'):
        network_io.load_safe(str(tmp_path / 'evil2.safetensors'))
    assert not os.path.exists('pwned')

def test_save_safe_needs_recorded_kwargs(tmp_path):
    with pytest.raises(ValueError, match='persistent'):
        network_io.save_safe(torch.nn.Linear(2, 2), str(tmp_path / 'x.safetensors'))
    assert os.listdir(tmp_path) == []

#----------------------------------------------------------------------------
# With EDM's networks (training/networks.py) and the golden weights.

CASE = 'ddpmpp_edm_cond'


EVAL = '''
def evaluate(net, path):
    import numpy as np, torch
    g = np.load(path, allow_pickle=False)
    t = {k: torch.from_numpy(g[k]) for k in ('x', 'sigma', 'class_labels', 'augment_labels')}
    with torch.no_grad():
        return net(t['x'], t['sigma'], t['class_labels'], force_fp32=True, augment_labels=t['augment_labels']).numpy()
'''

@pytest.mark.slow
def test_edm_network_pickle_and_safe_roundtrip(tmp_path):
    from training import networks
    cfg = json.load(open(os.path.join(GOLDEN, f'{CASE}.json')))
    g = np.load(os.path.join(GOLDEN, f'{CASE}.npz'), allow_pickle=False)
    net = networks.EDMPrecond(**cfg['constructor_kwargs'])
    net.load_state_dict({k[6:]: torch.from_numpy(g[k]) for k in g.files if k.startswith('state/')}, strict=True)
    with open(tmp_path / 'network-snapshot-000000.pkl', 'wb') as f:
        pickle.dump(dict(ema=net, loss_fn=None, augment_pipe=None, dataset_kwargs=dict(path='x.zip')), f)
    network_io.save_safe(net, str(tmp_path / 'net.safetensors'))
    npz = os.path.join(GOLDEN, f'{CASE}.npz')

    # 1) A fresh interpreter where training/ cannot be imported: plain pickle.load, as with EDM's files.
    site = tmp_path / 'site'
    for pkg in ('dnnlib', 'torch_utils'):
        shutil.copytree(os.path.join(REPO, pkg), site / pkg, ignore=shutil.ignore_patterns('__pycache__'))
    proc = _run([sys.executable, '-c', EVAL + textwrap.dedent(f'''
        import importlib.util, pickle, numpy as np
        assert importlib.util.find_spec('training') is None
        net = pickle.load(open('network-snapshot-000000.pkl', 'rb'))['ema'].eval()
        assert type(net).__module__.startswith('_imported_module_')
        np.save('out_isolated.npy', evaluate(net, {npz!r}))
    ''')], cwd=tmp_path, pythonpath=site)
    assert proc.returncode == 0, proc.stderr[-3000:]

    # 2) A fresh interpreter with the repository: load_network on the pickle and the safe file.
    proc = _run([sys.executable, '-c', EVAL + textwrap.dedent(f'''
        import numpy as np
        from training import network_io
        pkl = network_io.load_network('network-snapshot-000000.pkl')
        safe = network_io.load_network('net.safetensors')
        assert type(safe).__module__ == 'training.networks' and type(pkl).__module__.startswith('_imported_module_')
        np.save('out_pickle.npy', evaluate(pkl, {npz!r}))
        np.save('out_safe.npy', evaluate(safe, {npz!r}))
    ''')], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'unpickling runs code' in proc.stdout

    outs = {k: np.load(tmp_path / f'out_{k}.npy') for k in ('isolated', 'pickle', 'safe')}
    assert np.array_equal(outs['isolated'], outs['pickle']) and np.array_equal(outs['pickle'], outs['safe'])
    ref = g['out']
    tol = cfg['tolerance']['suggested']['per_sample_rel_to_max_abs']
    for i in range(ref.shape[0]): # and it is EDM's function (golden tolerance)
        assert np.abs(outs['safe'][i] - ref[i]).max() <= tol * np.abs(ref[i]).max()

@pytest.mark.slow
def test_convert_network_cli(tmp_path):
    from training import networks
    cfg = json.load(open(os.path.join(GOLDEN, f'{CASE}.json')))
    net = networks.EDMPrecond(**cfg['constructor_kwargs'])
    with open(tmp_path / 'snap.pkl', 'wb') as f:
        pickle.dump(dict(ema=net), f)
    tool = os.path.join(REPO, 'tools', 'convert_network.py')
    # Run from elsewhere with no PYTHONPATH: the tool finds the library where pip install -e . put it. In that fresh
    # process the pickle's classes come from generated modules and map back to training.networks.
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    proc = subprocess.run([sys.executable, tool, '--src', 'snap.pkl', '--dest', 'out.safetensors'], cwd=str(tmp_path), env=env,
        capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'unpickling runs code' in proc.stdout and 'verified' in proc.stdout
    header = network_io.read_safe_header(str(tmp_path / 'out.safetensors'))
    assert header['class_name'] == 'training.networks.EDMPrecond' and header['init_kwargs'] == cfg['constructor_kwargs']
    loaded = network_io.load_safe(str(tmp_path / 'out.safetensors'))
    for (k1, v1), (k2, v2) in zip(net.state_dict().items(), loaded.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)

    bad = subprocess.run([sys.executable, tool, '--src', 'snap.pkl', '--dest', 'out.pt'], cwd=str(tmp_path), env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and '.safetensors' in bad.stderr
    missing = subprocess.run([sys.executable, tool, '--src', 'nope.pkl', '--dest', 'o.safetensors'], cwd=str(tmp_path), env=env, capture_output=True, text=True)
    assert missing.returncode != 0 and 'nope.pkl' in missing.stderr and not (tmp_path / 'o.safetensors').exists()

#----------------------------------------------------------------------------

def test_load_network_from_url(small_module, tmp_path, monkeypatch):
    import functools, http.server, threading
    net = small_module.SmallNet(3)
    served = tmp_path / 'served'
    served.mkdir()
    with open(served / 'network-snapshot-000001.pkl', 'wb') as f:
        pickle.dump(dict(ema=net), f)
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass
    httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), functools.partial(Quiet, directory=str(served)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(tmp_path / 'cache'))
    try:
        url = f'http://127.0.0.1:{httpd.server_address[1]}/network-snapshot-000001.pkl'
        loaded = network_io.load_network(url, verbose=False)
    finally:
        httpd.shutdown()
        httpd.server_close()
    x = torch.randn(2, 3)
    assert torch.equal(loaded(x, 1.0), net(x, 1.0))
    assert len(os.listdir(tmp_path / 'cache' / 'downloads')) == 1 # cached for next time

def test_files_of_an_earlier_version_load(tmp_path):
    # Snapshots and a training state written before the code moved (tests/golden/earlier/README.md).
    from training import networks, run_dir
    earlier = os.path.join(os.path.dirname(__file__), 'golden', 'earlier')
    pkl = network_io.load_network(os.path.join(earlier, 'network-snapshot-000000.pkl'), verbose=False)
    safe = network_io.load_network(os.path.join(earlier, 'network-snapshot-000000.safetensors'), verbose=False)
    assert type(safe) is networks.EDMPrecond and type(pkl).__name__ == 'EDMPrecond'
    assert pkl.state_dict().keys() == safe.state_dict().keys()
    assert all(torch.equal(pkl.state_dict()[k], safe.state_dict()[k]) for k in safe.state_dict())
    state = run_dir.load_training_state(os.path.join(earlier, 'training-state-000000.pt'))
    with open(os.path.join(earlier, 'training_options.json')) as f:
        kwargs = json.load(f)['network_kwargs']
    net = networks.EDMPrecond(img_resolution=16, img_channels=1, label_dim=10, # the digits: grayscale
                              **{k: v for k, v in kwargs.items() if k != 'class_name'})
    net.load_state_dict(state['ema'], strict=True)
    assert all(torch.equal(net.state_dict()[k], safe.state_dict()[k]) for k in safe.state_dict()) # the snapshot is the EMA
    assert state['cur_nimg'] == 32 and state['aot_pool'] == 16
