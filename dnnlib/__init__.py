# Small utilities shared by the programs: EasyDict, URL download cache, construct-by-name.

from .util import EasyDict, make_cache_dir_path
