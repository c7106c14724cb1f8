"""Pickle classes together with the source code of their module (EDM-compatible).

An instance of a class decorated with `persistent_class` pickles as a call to
`torch_utils.persistence._reconstruct_persistent_obj(meta)`, where `meta` carries the full source
of the module that defined the class. Unpickling executes that source in a fresh module named
`_imported_module_<hex>` and rebuilds the object from it, so a pickle keeps working after the code
has changed or when the original module cannot be imported at all.

The format is EDM's (NVlabs/edm, StyleGAN2-ADA/3): the names below, `_version = 6` and the meta
fields are what published network pickles refer to, so they must not change. The embedded sources
themselves import `torch_utils.persistence` and `torch_utils.misc`, which must stay importable.

Security: unpickling such a file runs the code inside it. Load pickles only from sources you trust;
training/network_io.py offers a safetensors format that loads without running file code.
"""

import copy
import inspect
import io
import pickle
import sys
import types
import uuid

import dnnlib

#----------------------------------------------------------------------------

_version            = 6         # format version written into every pickle; EDM's value
_decorators         = set()     # persistent (decorated) classes
_import_hooks       = []        # functions meta -> meta, applied when unpickling
_module_to_src_dict = dict()    # module -> source
_src_to_module_dict = dict()    # source -> module

#----------------------------------------------------------------------------

def persistent_class(orig_class):
    """Class decorator: instances pickle with the source of the defining module.

    The decorated class also records its constructor arguments, available as `obj.init_args` and
    `obj.init_kwargs` (set `self._record_init_args = False` in the constructor to opt out). Other
    classes of the same module that a persistent object holds must be decorated too; imported
    modules are not embedded and must be importable when unpickling.
    """
    assert isinstance(orig_class, type)
    if is_persistent(orig_class):
        return orig_class

    if orig_class.__module__ not in sys.modules:
        raise ValueError(f'persistent_class: module {orig_class.__module__!r} of {orig_class.__name__} is not imported')
    orig_module = sys.modules[orig_class.__module__]
    orig_module_src = _module_to_src(orig_module)

    class Decorator(orig_class):
        _orig_module_src = orig_module_src
        _orig_class_name = orig_class.__name__

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            record = getattr(self, '_record_init_args', True)
            self._init_args = copy.deepcopy(args) if record else None
            self._init_kwargs = copy.deepcopy(kwargs) if record else None
            # The class must be reachable by name in its module, or unpickling cannot find it.
            assert orig_class.__name__ in orig_module.__dict__, f'{orig_class.__name__} is not a top-level name of {orig_module.__name__}'
            _check_pickleable(self.__reduce__())

        @property
        def init_args(self):
            assert self._init_args is not None, 'constructor arguments were not recorded'
            return copy.deepcopy(self._init_args)

        @property
        def init_kwargs(self):
            assert self._init_kwargs is not None, 'constructor arguments were not recorded'
            return dnnlib.EasyDict(copy.deepcopy(self._init_kwargs))

        def __reduce__(self):
            fields = list(super().__reduce__())
            fields += [None] * max(3 - len(fields), 0)
            if fields[0] is not _reconstruct_persistent_obj:
                meta = dict(type='class', version=_version, module_src=self._orig_module_src,
                    class_name=self._orig_class_name, state=fields[2])
                fields[0] = _reconstruct_persistent_obj
                fields[1] = (meta,)
                fields[2] = None # state travels inside meta
            return tuple(fields)

    Decorator.__name__ = orig_class.__name__
    Decorator.__qualname__ = orig_class.__qualname__
    Decorator.__module__ = orig_class.__module__
    _decorators.add(Decorator)
    return Decorator

#----------------------------------------------------------------------------

def is_persistent(obj):
    """True if `obj` is a persistent class or an instance of one."""
    try:
        if obj in _decorators:
            return True
    except TypeError: # unhashable
        pass
    return type(obj) in _decorators

#----------------------------------------------------------------------------

def import_hook(hook):
    """Register `hook(meta) -> meta`, called on every persistent object being unpickled.

    `meta` is a dnnlib.EasyDict with fields type ('class'), version, module_src, class_name and
    state. A hook can patch `meta.module_src`, e.g. when an API the old source uses has changed.
    """
    assert callable(hook)
    _import_hooks.append(hook)
    return hook

#----------------------------------------------------------------------------

def _reconstruct_persistent_obj(meta):
    """Called by pickle to rebuild a persistent object. Its name is part of the file format."""
    meta = dnnlib.EasyDict(meta)
    meta.state = dnnlib.EasyDict(meta.state)
    for hook in _import_hooks:
        meta = hook(meta)
        assert meta is not None, 'persistence import hook returned None'

    if meta.version != _version:
        raise pickle.UnpicklingError(f'Persistent object format version {meta.version} is not supported (expected {_version})')
    if meta.type != 'class':
        raise pickle.UnpicklingError(f'Unknown persistent object type {meta.type!r}')
    module = _src_to_module(meta.module_src)
    orig_class = module.__dict__[meta.class_name]
    decorator_class = persistent_class(orig_class)
    obj = decorator_class.__new__(decorator_class)

    setstate = getattr(obj, '__setstate__', None)
    if callable(setstate):
        setstate(meta.state)
    else:
        obj.__dict__.update(meta.state)
    return obj

#----------------------------------------------------------------------------

def _module_to_src(module):
    src = _module_to_src_dict.get(module, None)
    if src is None:
        src = inspect.getsource(module)
        _module_to_src_dict[module] = src
        _src_to_module_dict[src] = module
    return src

def _src_to_module(src):
    # One module per distinct source: objects from the same pickled module share their classes.
    module = _src_to_module_dict.get(src, None)
    if module is None:
        module_name = '_imported_module_' + uuid.uuid4().hex
        module = types.ModuleType(module_name)
        sys.modules[module_name] = module
        _module_to_src_dict[module] = src
        _src_to_module_dict[src] = module
        exec(src, module.__dict__) # this is where a pickle's code runs
    return module

#----------------------------------------------------------------------------

def _check_pickleable(obj):
    """Fail early (at construction) if an object could not be pickled; cheaper than pickling it."""
    def strip(obj):
        if isinstance(obj, (list, tuple, set)):
            return [strip(x) for x in obj]
        if isinstance(obj, dict):
            return [[strip(k), strip(v)] for k, v in obj.items()]
        if isinstance(obj, (str, int, float, bool, bytes, bytearray)) or obj is None:
            return None
        if type(obj).__module__ in ('numpy', 'torch', 'torch.nn.parameter') and type(obj).__name__ in ('ndarray', 'Tensor', 'Parameter'):
            return None # arrays and tensors pickle fine; skip their (costly) data
        if is_persistent(obj):
            return None # checked when it was constructed
        return obj
    with io.BytesIO() as f:
        pickle.dump(strip(obj), f)

#----------------------------------------------------------------------------
