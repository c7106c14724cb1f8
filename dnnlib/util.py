"""Small utilities the programs share: EasyDict, time formatting, construct-by-name, logging,
and URL opening with a download cache."""

import contextlib
import glob
import hashlib
import importlib
import io
import os
import re
import sys
import tempfile
import time
import types
import urllib.parse
import urllib.request
import uuid
from typing import Any

#----------------------------------------------------------------------------
# Lists of integers on the command line: '0-4,10'.

def parse_ranges(text, what='number'):
    """'0-4,10' -> [range(0, 5), range(10, 11)]. Raises ValueError naming the bad part. Ranges rather
    than a list, so that a caller can check the count before a huge list is built."""
    ranges = []
    for part in text.split(','):
        m = re.fullmatch(r'\s*(\d+)\s*(?:-\s*(\d+)\s*)?', part)
        if m is None:
            raise ValueError(f'"{part}" is neither a {what} nor a range like 5-7')
        lo = int(m.group(1))
        hi = lo if m.group(2) is None else int(m.group(2))
        if hi < lo:
            raise ValueError(f'range "{part}" is empty; write it low-high')
        ranges.append(range(lo, hi + 1))
    return ranges

def parse_int_list(text, what='number'):
    """'1,2,5-7' -> [1, 2, 5, 6, 7]; a list (an option a run folder recorded) is returned as it is."""
    return text if isinstance(text, list) else [i for r in parse_ranges(text, what) for i in r]

#----------------------------------------------------------------------------
# Files that appear complete or not at all.

def current_umask() -> int:
    """The process umask. Read from /proc where possible: os.umask can only be read by setting it,
    which briefly changes it for every thread."""
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith('Umask:'):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask

def one_line(err, named=True):
    """An exception as one line for an error message, whitespace collapsed: 'Type: text' (named), or
    the text alone (its type's name when it has none)."""
    text = ' '.join(str(err).split())
    return f'{type(err).__name__}: {text}'.rstrip(': ') if named else text or type(err).__name__

@contextlib.contextmanager
def atomic_write(path, set_mode=True):
    """Yields a temporary path beside `path`; it is renamed to `path` only when the block completes,
    and removed otherwise, so an interrupted write never leaves a file that looks valid. With
    set_mode the file gets the permissions of a newly created one (0666 less the umask) even if the
    writer made it private (safetensors writes 0600)."""
    temp = f'{path}.tmp-{uuid.uuid4().hex}'
    try:
        yield temp
        if set_mode:
            os.chmod(temp, 0o666 & ~current_umask())
        os.replace(temp, path)
    except BaseException:
        if os.path.exists(temp):
            os.remove(temp)
        raise

def write_atomic(path, data):
    """Write bytes to path through atomic_write in few system calls, for generate.py's many small
    files: the file is created with 0666 less the umask, so no chmod (nor reading the umask) is needed."""
    with atomic_write(path, set_mode=False) as temp:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            view = memoryview(data)
            while view: # os.write may write less than asked
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)

#----------------------------------------------------------------------------
# Dictionary with attribute-style access.

class EasyDict(dict):
    """dict whose items can also be read and written as attributes: d.foo == d['foo']."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name)

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def __delattr__(self, name: str) -> None:
        del self[name]

#----------------------------------------------------------------------------
# Copy everything written to stdout/stderr into a log file as well.

class Logger:
    def __init__(self, file_name: str = None, file_mode: str = 'w', should_flush: bool = True):
        self.file = open(file_name, file_mode) if file_name is not None else None
        self.should_flush = should_flush
        self.stdout = sys.stdout
        self.stderr = sys.stderr
        sys.stdout = self
        sys.stderr = self

    def __enter__(self):
        return self

    def __exit__(self, *args):
        self.close()

    def write(self, text):
        if isinstance(text, bytes):
            text = text.decode()
        if self.file is not None:
            self.file.write(text)
        self.stdout.write(text)
        if self.should_flush:
            self.flush()

    def flush(self):
        if self.file is not None:
            self.file.flush()
        self.stdout.flush()

    def close(self):
        self.flush()
        # Restore the streams only if they still point to us (another Logger may have replaced them).
        if sys.stdout is self:
            sys.stdout = self.stdout
        if sys.stderr is self:
            sys.stderr = self.stderr
        if self.file is not None:
            self.file.close()
            self.file = None

#----------------------------------------------------------------------------
# Formatting and parsing.

def format_time(seconds) -> str:
    """Human-readable duration: '42s', '3m 05s', '2h 07m 00s', '1d 04h 00m'."""
    s = int(round(seconds))
    if s < 60:
        return f'{s}s'
    if s < 60 * 60:
        return f'{s // 60}m {s % 60:02d}s'
    if s < 24 * 60 * 60:
        return f'{s // 3600}h {(s // 60) % 60:02d}m {s % 60:02d}s'
    return f'{s // 86400}d {(s // 3600) % 24:02d}h {(s // 60) % 60:02d}m'

def is_url(obj: Any, allow_file_urls: bool = False) -> bool:
    """True for strings like 'https://host/path' (and 'file://...' when allow_file_urls)."""
    if not isinstance(obj, str) or '://' not in obj:
        return False
    if obj.startswith('file://'):
        return allow_file_urls
    try:
        res = urllib.parse.urlparse(obj)
    except ValueError:
        return False
    return bool(res.scheme) and bool(res.netloc)

#----------------------------------------------------------------------------
# Look up and call functions / classes by their dotted name, e.g. 'training.networks.EDMPrecond'.

def get_module_from_obj_name(obj_name: str):
    """Split 'a.b.c.name' into (module, 'name'), importing the longest importable module prefix."""
    parts = obj_name.split('.')
    # Try the longest module path first so that 'pkg.mod.Class.attr' resolves as well.
    for i in range(len(parts) - 1, 0, -1):
        module_name = '.'.join(parts[:i])
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            # Only "this very module does not exist" means keep looking; a missing import *inside*
            # an existing module is a real error the user has to see.
            if err.name is None or not (module_name == err.name or module_name.startswith(err.name + '.')):
                raise
            continue
        try:
            get_obj_from_module(module, '.'.join(parts[i:]))
        except AttributeError:
            continue
        return module, '.'.join(parts[i:])
    # Bare name: a builtin or something already importable as a top-level module.
    if len(parts) == 1:
        try:
            return importlib.import_module(obj_name), ''
        except ModuleNotFoundError:
            import builtins
            if hasattr(builtins, obj_name):
                return builtins, obj_name
    raise ImportError(f'Cannot find {obj_name!r}: no importable module defines it (check the name and that the repository root is on sys.path)')

def get_obj_from_module(module: types.ModuleType, obj_name: str) -> Any:
    obj = module
    for part in obj_name.split('.') if obj_name else []:
        obj = getattr(obj, part)
    return obj

def get_obj_by_name(name: str) -> Any:
    module, obj_name = get_module_from_obj_name(name)
    return get_obj_from_module(module, obj_name)

def call_func_by_name(*args, func_name: str = None, **kwargs) -> Any:
    assert func_name is not None, 'call_func_by_name: func_name is required'
    func_obj = get_obj_by_name(func_name)
    if not callable(func_obj):
        raise TypeError(f'{func_name} is not callable')
    return func_obj(*args, **kwargs)

def construct_class_by_name(*args, class_name: str = None, **kwargs) -> Any:
    assert class_name is not None, 'construct_class_by_name: class_name is required'
    return call_func_by_name(*args, func_name=class_name, **kwargs)

#----------------------------------------------------------------------------
# Cache directory for downloads: set_cache_dir(), else $DNNLIB_CACHE_DIR, else ~/.cache/dnnlib
# (EDM's location, so files EDM already downloaded are reused).

_dnnlib_cache_dir = None

def set_cache_dir(path: str) -> None:
    global _dnnlib_cache_dir
    _dnnlib_cache_dir = path

def make_cache_dir_path(*paths: str) -> str:
    if _dnnlib_cache_dir is not None:
        return os.path.join(_dnnlib_cache_dir, *paths)
    if 'DNNLIB_CACHE_DIR' in os.environ:
        return os.path.join(os.environ['DNNLIB_CACHE_DIR'], *paths)
    if 'HOME' in os.environ:
        return os.path.join(os.environ['HOME'], '.cache', 'dnnlib', *paths)
    if 'USERPROFILE' in os.environ:
        return os.path.join(os.environ['USERPROFILE'], '.cache', 'dnnlib', *paths)
    return os.path.join(tempfile.gettempdir(), '.cache', 'dnnlib', *paths)

#----------------------------------------------------------------------------
# URL opening with a download cache.

def _sha256_of_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    return h.hexdigest()

def url_cache_path(url: str, cache_dir: str = None) -> str:
    """Where open_url keeps (or expects) the downloaded copy of `url`; a user may place it there by hand.

    Named '<md5 of url>_<file name>' like EDM's cache, so an existing EDM cache is reused."""
    if cache_dir is None:
        cache_dir = make_cache_dir_path('downloads')
    url_md5 = hashlib.md5(url.encode('utf-8')).hexdigest()
    name = os.path.basename(urllib.parse.urlparse(url).path) or 'download'
    return os.path.join(cache_dir, url_md5 + '_' + re.sub(r'[^0-9a-zA-Z-._]', '_', name))

def open_url(url: str, cache_dir: str = None, num_attempts: int = 10, verbose: bool = True,
        return_filename: bool = False, cache: bool = True, sha256: str = None) -> Any:
    """Open a URL or local path as a binary file object (or return a local file name).

    Downloads are cached in `cache_dir` (default: make_cache_dir_path('downloads')): written to a
    temporary name and renamed when complete, so an interrupted download never looks finished.
    With `sha256`, the download (and any cached copy) must have that SHA-256 hex digest.
    """
    assert num_attempts >= 1
    assert not (return_filename and not cache), 'return_filename requires cache=True'

    # Local paths and file:// URLs are used in place.
    if not re.match(r'^[a-z][a-z0-9+.-]*://', url):
        if not os.path.isfile(url):
            raise IOError(f'File not found: {url}')
        path = url
    elif url.startswith('file://'):
        path = urllib.request.url2pathname(urllib.parse.urlparse(url).path)
        if not os.path.isfile(path):
            raise IOError(f'File not found: {path} (from {url})')
    else:
        path = None
    if path is not None:
        if sha256 is not None and _sha256_of_file(path) != sha256.lower():
            raise IOError(f'Checksum mismatch for {path}: expected sha256 {sha256}')
        return path if return_filename else open(path, 'rb')

    # Cached copy (also picks up files EDM's own cache stored under another name for this URL).
    cache_file = url_cache_path(url, cache_dir)
    if cache:
        candidates = [cache_file] + sorted(glob.glob(os.path.join(glob.escape(os.path.dirname(cache_file)), os.path.basename(cache_file).split('_')[0] + '_*')))
        for candidate in candidates:
            if os.path.isfile(candidate) and '.tmp.' not in candidate:
                if sha256 is not None and _sha256_of_file(candidate) != sha256.lower():
                    raise IOError(f'Cached file {candidate} for {url} does not have the expected sha256 {sha256}; delete it to download again')
                return candidate if return_filename else open(candidate, 'rb')

    # Download into a temporary file next to the cache file, with retries; rename when complete and verified.
    import requests # imported here so that programs that never download do not need it
    if cache:
        os.makedirs(os.path.dirname(cache_file), exist_ok=True)
    last_error = None
    for attempt in range(num_attempts):
        temp_file = cache_file + '.tmp.' + uuid.uuid4().hex
        try:
            with (open(temp_file, 'wb') if cache else io.BytesIO()) as f:
                digest = _download(url, f, verbose=verbose)
                if sha256 is not None and digest != sha256.lower():
                    raise _ChecksumError(f'Checksum mismatch for {url}: got sha256 {digest}, expected {sha256}. Nothing was cached; '
                        f'if the file is right, place it at {cache_file} by hand')
                if not cache:
                    return io.BytesIO(f.getvalue())
            os.replace(temp_file, cache_file)
            return cache_file if return_filename else open(cache_file, 'rb')
        except _ChecksumError:
            raise
        except (requests.RequestException, IOError) as err:
            last_error = err
            status = getattr(getattr(err, 'response', None), 'status_code', None)
            if status is not None and 400 <= status < 500 and status != 429:
                break # the server says no (e.g. 404); asking again will not help
            if attempt + 1 < num_attempts:
                time.sleep(min(attempt + 1, 5))
        finally:
            if os.path.exists(temp_file):
                os.remove(temp_file)
    raise IOError(f'Could not download {url} after {num_attempts} attempt(s): {last_error}. '
        f'If this machine has no access, download the file elsewhere and place it at {cache_file}')

class _ChecksumError(IOError):
    pass

def _download(url: str, f, verbose: bool) -> str:
    """Stream `url` into the binary file object `f`; return the SHA-256 hex digest of the data."""
    import requests
    from tqdm import tqdm
    h = hashlib.sha256()
    size = 0
    with requests.get(url, stream=True, timeout=(10, 60)) as res:
        res.raise_for_status()
        total = int(res.headers.get('content-length', 0)) or None
        name = os.path.basename(urllib.parse.urlparse(url).path) or url
        with tqdm(total=total, unit='B', unit_scale=True, desc=f'Downloading {name}', disable=not verbose, leave=False) as bar:
            for chunk in res.iter_content(chunk_size=1 << 20):
                f.write(chunk)
                h.update(chunk)
                size += len(chunk)
                bar.update(len(chunk))
    if total is not None and size != total:
        raise IOError(f'incomplete download: got {size} of {total} bytes')
    return h.hexdigest()

#----------------------------------------------------------------------------
