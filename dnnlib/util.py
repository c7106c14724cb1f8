"""Miscellaneous utilities: EasyDict, construct-by-name, URL opening with a download cache."""

import contextlib
import ctypes
import hashlib
import importlib
import inspect
import io
import os
import re
import shutil
import sys
import tempfile
import time
import types
import urllib.parse
import uuid
from typing import Any

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
# Cache directory for downloads: $DNNLIB_CACHE_DIR, else $HOME/.cache/dnnlib (EDM's location).

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
