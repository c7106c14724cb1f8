"""dnnlib.util: EasyDict, names, time formatting, open_url and its download cache."""

import hashlib
import http.server
import os
import socket
import threading

import pytest

import dnnlib
from dnnlib import util

#----------------------------------------------------------------------------

def test_easydict():
    d = dnnlib.EasyDict(a=1)
    d.b = 2
    assert d == {'a': 1, 'b': 2} and d.a == 1 and d['b'] == 2
    del d.a
    assert 'a' not in d
    with pytest.raises(AttributeError):
        d.missing
    assert dnnlib.util.EasyDict is dnnlib.EasyDict

def test_format_time():
    assert util.format_time(0) == '0s'
    assert util.format_time(59.4) == '59s'
    assert util.format_time(125) == '2m 05s'
    assert util.format_time(2 * 3600 + 7 * 60 + 3) == '2h 07m 03s'
    assert util.format_time(86400 + 4 * 3600 + 60) == '1d 04h 01m'

def test_logger_tees_and_restores(tmp_path, capsys):
    import sys
    before = sys.stdout
    with util.Logger(file_name=str(tmp_path / 'log.txt'), file_mode='a'):
        print('hello')
        print('to stderr', file=sys.stderr)
    assert sys.stdout is before
    assert (tmp_path / 'log.txt').read_text() == 'hello\nto stderr\n'
    assert 'hello' in capsys.readouterr().out

def test_is_url():
    assert util.is_url('https://example.com/a.pkl')
    assert util.is_url('http://127.0.0.1:8000/x')
    assert not util.is_url('runs/00000/network-snapshot-000000.pkl')
    assert not util.is_url('file:///tmp/x.pkl')
    assert util.is_url('file:///tmp/x.pkl', allow_file_urls=True)
    assert not util.is_url(None)

def test_by_name():
    import torch
    assert util.get_obj_by_name('torch.nn.Linear') is torch.nn.Linear
    assert util.get_obj_by_name('os.path.join') is os.path.join
    lin = util.construct_class_by_name(3, 4, class_name='torch.nn.Linear', bias=False)
    assert lin.weight.shape == (4, 3) and lin.bias is None
    assert util.call_func_by_name(2, 5, func_name='builtins.max') == 5
    with pytest.raises(ImportError, match='no_such_module'):
        util.get_obj_by_name('no_such_module.Thing')
    with pytest.raises(ImportError):
        util.get_obj_by_name('torch.nn.NoSuchLayer')

def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(tmp_path))
    assert util.make_cache_dir_path('downloads') == os.path.join(str(tmp_path), 'downloads')
    assert util.url_cache_path('https://h.org/dir/file.pkl').startswith(os.path.join(str(tmp_path), 'downloads'))
    util.set_cache_dir(str(tmp_path / 'explicit'))
    try:
        assert util.make_cache_dir_path('x') == os.path.join(str(tmp_path / 'explicit'), 'x')
    finally:
        util.set_cache_dir(None)

#----------------------------------------------------------------------------
# open_url against a local HTTP server.

PAYLOAD = os.urandom(3 << 20) # a few chunks of the 1 MiB stream

@pytest.fixture
def server():
    hits = []
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            if self.path.startswith('/truncated'): # announces more bytes than it sends
                self.send_response(200)
                self.send_header('Content-Length', str(len(PAYLOAD)))
                self.end_headers()
                self.wfile.write(PAYLOAD[:1000])
                return
            if not self.path.startswith('/files/'):
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header('Content-Length', str(len(PAYLOAD)))
            self.end_headers()
            self.wfile.write(PAYLOAD)
        def log_message(self, *args):
            pass
    httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f'http://127.0.0.1:{httpd.server_address[1]}', hits
    httpd.shutdown()
    httpd.server_close()

def _cache_listing(cache_dir):
    return sorted(os.listdir(cache_dir)) if os.path.isdir(cache_dir) else []

def test_open_url_downloads_once_and_caches(server, tmp_path):
    base, hits = server
    url = f'{base}/files/net.pkl'
    digest = hashlib.sha256(PAYLOAD).hexdigest()
    with util.open_url(url, cache_dir=str(tmp_path), verbose=False, sha256=digest) as f:
        assert f.read() == PAYLOAD
    assert len(hits) == 1
    # Second open: served from the cache, no request; file named where the error message says.
    path = util.open_url(url, cache_dir=str(tmp_path), verbose=False, return_filename=True)
    assert len(hits) == 1
    assert path == util.url_cache_path(url, str(tmp_path)) and path.endswith('_net.pkl')
    assert _cache_listing(tmp_path) == [os.path.basename(path)] # no temporary files left
    # cache=False: in memory, nothing written.
    with util.open_url(url, cache_dir=str(tmp_path / 'other'), verbose=False, cache=False) as f:
        assert f.read() == PAYLOAD
    assert not (tmp_path / 'other').exists()

def test_open_url_checksum_mismatch_leaves_nothing(server, tmp_path):
    base, hits = server
    url = f'{base}/files/bad.pkl'
    with pytest.raises(IOError, match='Checksum mismatch') as exc:
        util.open_url(url, cache_dir=str(tmp_path), verbose=False, sha256='0' * 64, num_attempts=3)
    assert len(hits) == 1 # a wrong file is not retried
    assert util.url_cache_path(url, str(tmp_path)) in str(exc.value)
    assert _cache_listing(tmp_path) == []

def test_open_url_incomplete_download_leaves_nothing(server, tmp_path):
    base, hits = server
    url = f'{base}/truncated/x.pkl'
    with pytest.raises(IOError, match='Could not download'):
        util.open_url(url, cache_dir=str(tmp_path), verbose=False, num_attempts=2)
    assert len(hits) == 2
    assert _cache_listing(tmp_path) == []

def test_open_url_unreachable_names_url_and_cache_path(tmp_path):
    with socket.socket() as s: # a port nobody listens on
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    url = f'http://127.0.0.1:{port}/metrics/inception-2015-12-05.pkl'
    with pytest.raises(IOError) as exc:
        util.open_url(url, cache_dir=str(tmp_path), verbose=False, num_attempts=1)
    msg = str(exc.value)
    assert url in msg and util.url_cache_path(url, str(tmp_path)) in msg
    # Placing the file there by hand makes it work offline.
    dest = util.url_cache_path(url, str(tmp_path))
    with open(dest, 'wb') as f:
        f.write(b'hand-placed')
    with util.open_url(url, cache_dir=str(tmp_path), verbose=False, num_attempts=1) as f:
        assert f.read() == b'hand-placed'
    with pytest.raises(IOError, match='sha256'):
        util.open_url(url, cache_dir=str(tmp_path), verbose=False, sha256='0' * 64)

def test_open_url_local_paths(tmp_path):
    p = tmp_path / 'a.bin'
    p.write_bytes(b'abc')
    with util.open_url(str(p)) as f:
        assert f.read() == b'abc'
    assert util.open_url(p.as_uri(), return_filename=True) == str(p)
    with pytest.raises(IOError, match='not found'):
        util.open_url(str(tmp_path / 'missing.pkl'))

#----------------------------------------------------------------------------

def test_open_url_not_found_is_not_retried(server, tmp_path):
    base, hits = server
    with pytest.raises(IOError, match='404'):
        util.open_url(f'{base}/nope.pkl', cache_dir=str(tmp_path), verbose=False, num_attempts=5)
    assert len(hits) == 1

#----------------------------------------------------------------------------
# torch_utils.misc

import json
import subprocess
import sys
import textwrap

import numpy as np
import torch

from torch_utils import misc

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def test_constant_and_assert_shape():
    a = misc.constant([1, 2], dtype=torch.float32)
    assert a is misc.constant([1, 2], dtype=torch.float32) # cached
    assert misc.constant(3.0, shape=[2, 2]).tolist() == [[3.0, 3.0], [3.0, 3.0]]
    assert misc.constant([1, 2], dtype=torch.int64).dtype == torch.int64
    misc.assert_shape(torch.zeros(2, 3), [None, 3])
    with pytest.raises(AssertionError, match='dimension 1'):
        misc.assert_shape(torch.zeros(2, 3), [2, 4])
    with pytest.raises(AssertionError, match='dimensions'):
        misc.assert_shape(torch.zeros(2, 3), [2])

def test_params_copy_and_nan_to_num():
    src = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    dst = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    src[1].running_mean.fill_(7)
    misc.copy_params_and_buffers(src, dst, require_all=True)
    for (n1, t1), (n2, t2) in zip(misc.named_params_and_buffers(src), misc.named_params_and_buffers(dst)):
        assert n1 == n2 and torch.equal(t1, t2)
    assert len(misc.params_and_buffers(src)) == 4 + 3
    with pytest.raises(ValueError, match='lacks'):
        misc.copy_params_and_buffers(torch.nn.Sequential(torch.nn.Linear(3, 4)), dst, require_all=True)
    with pytest.raises(ValueError, match='shape'):
        misc.copy_params_and_buffers(torch.nn.Sequential(torch.nn.Linear(3, 5)), dst)
    lin = torch.nn.Linear(2, 1)
    lin.weight.grad = torch.tensor([[float('nan'), float('inf')]])
    misc.nan_to_num_grads_(lin)
    assert lin.weight.grad.tolist() == [[0.0, 1e5]]

def test_print_module_summary(capsys):
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    out = misc.print_module_summary(net, [torch.zeros(5, 4)])
    assert out.shape == (5, 2)
    text = capsys.readouterr().out
    assert '[5, 8]' in text and '[5, 2]' in text
    assert text.strip().splitlines()[-1].split()[:2] == ['Total', str(4 * 8 + 8 + 8 * 2 + 2)]

#----------------------------------------------------------------------------
# torch_utils.distributed + training_stats with two real processes (torchrun, gloo on CPU).

WORKER = '''
import json, sys, torch
from torch_utils import distributed as dist, training_stats, misc
dist.init()
rank, world = dist.get_rank(), dist.get_world_size()
# A GPU wherever one is visible (two ranks may share it, with gloo), else the CPU.
assert world == 2 and dist.device().type == ('cuda' if torch.cuda.is_available() else 'cpu')
stats = training_stats.Collector(regex='Test/.*')
# Ranks report different values, in different orders: rank 0 -> [1], rank 1 -> [2, 2].
if rank == 0:
    training_stats.report('Test/a', [1.0]); training_stats.report0('Test/b', 10.0)
else:
    training_stats.report0('Test/b', 99.0); training_stats.report('Test/a', torch.tensor([2.0, 2.0]))
stats.update()
torch.manual_seed(0)
same = torch.nn.Linear(3, 3)
misc.check_ddp_consistency(same)
torch.manual_seed(rank)
differs = torch.nn.Linear(3, 3)
try:
    misc.check_ddp_consistency(differs)
    ddp_caught = False
except AssertionError:
    ddp_caught = True
dist.barrier()
result = dict(rank=rank, a_num=stats.num('Test/a'), a_mean=stats.mean('Test/a'), a_std=stats.std('Test/a'),
    b_num=stats.num('Test/b'), b_mean=stats.mean('Test/b'), ddp_caught=ddp_caught)
with open(sys.argv[1] + f'.{rank}', 'w') as f:
    json.dump(result, f)
'''

@pytest.mark.slow
def test_distributed_training_stats_two_processes(tmp_path):
    script = tmp_path / 'worker.py'
    script.write_text(WORKER)
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
        str(script), str(tmp_path / 'result')], env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in range(2):
        r = json.loads((tmp_path / f'result.{rank}').read_text())
        assert r['rank'] == rank
        assert r['a_num'] == 3 and r['a_mean'] == pytest.approx(5 / 3)
        assert r['a_std'] == pytest.approx(np.std([1, 2, 2]))
        assert r['b_num'] == 1 and r['b_mean'] == 10.0 # report0: only rank 0 counts
        assert r['ddp_caught'] == (rank == 1) # rank 1's differing weights are detected, and nobody hangs

@pytest.mark.slow
def test_distributed_single_process_without_torchrun(tmp_path):
    code = textwrap.dedent('''
        import torch
        from torch_utils import distributed as dist, training_stats
        dist.init()
        assert (dist.get_rank(), dist.get_world_size()) == (0, 1)
        t = torch.ones(2); torch.distributed.all_reduce(t); assert t.tolist() == [1.0, 1.0]
        c = training_stats.Collector()
        training_stats.report('x', [1.0, 3.0]); c.update()
        assert c.mean('x') == 2.0 and c.num('x') == 2
        dist.print0('ok'); dist.barrier()
    ''')
    env = {k: v for k, v in os.environ.items() if k not in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT')}
    env['PYTHONPATH'] = REPO
    proc = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == 'ok'

#----------------------------------------------------------------------------
# Which device and backend a process takes (pure function), and init() acting on it.

from torch_utils.distributed import choose_backend, choose_device

@pytest.mark.parametrize('local_rank,gpus,device', [
    (0, 0, 'cpu'), (0, 1, 'cuda:0'), (3, 8, 'cuda:3'),
    (5, 1, 'cuda:0'), # a launcher that shows each process one GPU, or 8 ranks sharing one
    (3, 2, 'cuda:1'), # ranks go round the visible GPUs
])
def test_choose_device(local_rank, gpus, device):
    assert choose_device(local_rank, gpus) == torch.device(device)

@pytest.mark.parametrize('gpus,nccl,backend,why', [
    ([None, None], True, 'gloo', None),                      # CPU-only machines: nothing to say
    (['a'], True, 'nccl', None),
    (['a', 'b', 'c', 'd'], True, 'nccl', None),              # a GPU per rank, each rank seeing all of them
    ([f'uuid {i}' for i in range(8)], True, 'nccl', None),   # per-task binding: each rank sees its own GPU as cuda:0
    (['a', 'a'], True, 'gloo', 'rank(s) 0,1 share GPUs (2 ranks on 1 GPUs)'), # NCCL would refuse
    (['a', 'b', 'a', 'b'], True, 'gloo', 'rank(s) 0,1,2,3 share GPUs (4 ranks on 2 GPUs)'),
    (['a', 'b', 'c', 'c'], True, 'gloo', 'rank(s) 2,3 share GPUs'),
    (['a', None], True, 'gloo', 'rank(s) 1 have no GPU'),
    (['a', 'b'], False, 'gloo', 'this torch has no NCCL'),
])
def test_choose_backend(gpus, nccl, backend, why):
    chosen, reason = choose_backend(gpus, nccl)
    assert chosen == backend and (reason is None) == (why is None)
    if why:
        assert reason.startswith(why)

def test_device_never_the_cpu_beside_a_gpu(monkeypatch):
    # The module's helpers follow choose_device: 8 processes per node, each shown one GPU.
    from torch_utils import distributed as dist
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 1)
    monkeypatch.setenv('LOCAL_WORLD_SIZE', '8')
    monkeypatch.setenv('LOCAL_RANK', '5')
    assert dist.use_cuda() and dist.device() == torch.device('cuda', 0)
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    assert not dist.use_cuda() and dist.device() == torch.device('cpu')

PRETEND_GPU = textwrap.dedent('''
    import os, sys, types, torch
    # One (pretended) GPU visible to this process, whose UUID the test gives; NCCL is taken to be
    # there, and init_process_group only says which backend it was asked for.
    torch.cuda.is_available = lambda: True
    torch.cuda.device_count = lambda: 1
    torch.cuda.set_device = lambda device: None
    torch.cuda.get_device_properties = lambda device: types.SimpleNamespace(uuid=os.environ['GPU_UUID'])
    torch.distributed.is_nccl_available = lambda: True
    def init_process_group(backend, store, rank, world_size, **kwargs):
        print('backend', backend, flush=True)
        # Rank 0 hosts the store: it must not exit while another rank still talks to it.
        if rank > 0:
            store.add('left', 1) # the last call to the store
        while rank == 0 and store.add('left', 0) < world_size - 1:
            pass
        sys.exit(0)
    torch.distributed.init_process_group = init_process_group
    from torch_utils import distributed as dist
    dist.init()
''')

@pytest.mark.slow
@pytest.mark.parametrize('uuids,backend', [(['GPU-a', 'GPU-b'], 'nccl'), (['GPU-a', 'GPU-a'], 'gloo')])
def test_init_uses_nccl_on_distinct_gpus_seen_one_each(tmp_path, uuids, backend):
    # torchrun's environment for 2 ranks of a node, each shown one GPU (per-task binding): NCCL when
    # the GPUs are distinct, gloo with a warning from every rank when they are one GPU.
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, '-c', PRETEND_GPU], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=REPO, RANK=str(rank), WORLD_SIZE='2', LOCAL_RANK=str(rank),
                                       LOCAL_WORLD_SIZE='2', MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), GPU_UUID=uuid))
             for rank, uuid in enumerate(uuids)]
    for rank, proc in enumerate(procs):
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-3000:]
        lines = out.strip().splitlines()
        assert lines[-1] == f'backend {backend}'
        if backend == 'gloo':
            assert lines[0] == (f'Warning (rank {rank}): local rank {rank} runs on cuda:0 with gloo instead of NCCL (slower gradient '
                                'exchange): rank(s) 0,1 share GPUs (2 ranks on 1 GPUs), and NCCL needs a GPU per process. '
                                'Use --nproc_per_node at most the number of GPUs.')
        else:
            assert len(lines) == 1

#----------------------------------------------------------------------------

def test_training_stats_in_process():
    from torch_utils import training_stats
    c = training_stats.Collector(regex='InProc/.*', keep_previous=False)
    training_stats.report('InProc/x', torch.tensor([[1.0, 2.0], [3.0, 6.0]]))
    training_stats.report('InProc/x', [])
    training_stats.report('Other/y', 5.0)
    c.update()
    assert c.names() == ['InProc/x'] and c.num('InProc/x') == 4 and c['InProc/x'] == 3.0
    assert c.std('InProc/x') == pytest.approx(np.std([1, 2, 3, 6]))
    assert c.as_dict() == {'InProc/x': dict(num=4, mean=3.0, std=pytest.approx(np.std([1, 2, 3, 6])))}
    c.update() # nothing new reported: without keep_previous the statistic is empty
    assert c.num('InProc/x') == 0 and np.isnan(c.mean('InProc/x'))
    # A repeated single-process set-up after syncing is allowed; switching to multi-process is not.
    training_stats.init_multiprocessing(rank=0, sync_device=None)
    with pytest.raises(AssertionError):
        training_stats.init_multiprocessing(rank=1, sync_device=torch.device('cpu'))

def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / 'out.bin'
    with pytest.raises(RuntimeError):
        with dnnlib.util.atomic_write(str(target)) as tmp:
            open(tmp, 'wb').write(b'partial')
            raise RuntimeError('interrupted')
    assert list(tmp_path.iterdir()) == []
    with dnnlib.util.atomic_write(str(target)) as tmp:
        open(tmp, 'wb').write(b'complete')
    assert target.read_bytes() == b'complete' and list(tmp_path.iterdir()) == [target]

@pytest.mark.parametrize('umask', [0o022, 0o077, 0o002])
def test_atomic_write_gives_umask_permissions(tmp_path, umask):
    # The writer makes the file private, as safetensors does; the result must look like any new file.
    old = os.umask(umask)
    try:
        assert util.current_umask() == umask
        with dnnlib.util.atomic_write(str(tmp_path / 'out.bin')) as tmp:
            os.close(os.open(tmp, os.O_CREAT | os.O_WRONLY, 0o600))
    finally:
        os.umask(old)
    assert os.stat(tmp_path / 'out.bin').st_mode & 0o777 == 0o666 & ~umask

@pytest.mark.parametrize('umask', [0o022, 0o077])
def test_write_atomic_writes_whole_files_with_umask_permissions(tmp_path, umask):
    old = os.umask(umask)
    try:
        dnnlib.util.write_atomic(str(tmp_path / 'out.bin'), b'complete')
        (tmp_path / 'dir.bin').mkdir() # a target that cannot be replaced: the write fails, leaving nothing
        with pytest.raises(IsADirectoryError):
            dnnlib.util.write_atomic(str(tmp_path / 'dir.bin'), b'lost')
    finally:
        os.umask(old)
    assert (tmp_path / 'out.bin').read_bytes() == b'complete' and os.stat(tmp_path / 'out.bin').st_mode & 0o777 == 0o666 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir()) == ['dir.bin', 'out.bin'] and not list((tmp_path / 'dir.bin').iterdir())

def test_int_lists_parse_once_for_every_program():
    from dnnlib.util import parse_int_list
    assert parse_int_list('1,2,5-7') == [1, 2, 5, 6, 7] and parse_int_list(' 3 - 4 ') == [3, 4]
    assert parse_int_list([1, 2]) == [1, 2] # an option a run folder recorded
    for text, message in [('1,x', '"x" is neither a number nor a range like 5-7'), ('7-5', 'range "7-5" is empty'), ('', '"" is neither')]:
        with pytest.raises(ValueError, match=message):
            parse_int_list(text)
