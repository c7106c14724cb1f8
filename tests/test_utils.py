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
