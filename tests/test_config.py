"""A run's configuration (training/config.py), in this process and without the CLI: the checks of
the options, whose refusals name options by key (a program names its flags through
OptionError.message), the warnings, and the loop's arguments they give."""

import sys

import PIL.Image
import pytest

import dnnlib
import train
from torch_utils import distributed as dist
from training import config
from training.errors import Opt, OptionError
from training.testdata import make_dataset

DEFAULTS = train.main.make_context('train.py', []).params # the options dict train.py's main gets by default

def options(**changes):
    return dnnlib.EasyDict(DEFAULTS, **changes)

def flag(option, value=Opt.NONE):
    return f'--{option}' if value is Opt.NONE else f'--{option}={value}'

def refusal(fn, *args, **kwargs):
    """The OptionError fn raises; its plain text names no flag."""
    with pytest.raises(OptionError) as info:
        fn(*args, **kwargs)
    assert '--' not in str(info.value), str(info.value)
    return info.value

@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp('d') / 'data', n=64, res=8, num_classes=4)

#----------------------------------------------------------------------------
# Sizes: batch, per-GPU batch, pool, solver.

@pytest.mark.parametrize('changes, world, label_dim, message', [
    (dict(batch=15), 2, 4, 'batch=15 is not divisible by the number of GPUs (2); use a multiple of 2'),
    (dict(batch=16, batch_gpu=6), 1, 4, 'batch=16 over 1 GPU(s) is 16 per GPU, not a multiple of batch_gpu=6'),
    (dict(batch=32, batch_gpu=8, aot=20), 2, 4, 'aot=20 is not a multiple of the per-GPU batch 8; use e.g. aot=16'),
    (dict(batch=16, aot=8), 1, 4, 'aot=8 is not a multiple of the per-GPU batch 16; use e.g. aot=16'),
    (dict(batch=16, aot=16384, aot_solver='scipy'), 1, 0, 'aot_solver=scipy would solve exact assignments of 16384 noises: '
     'minutes per pool and 2 GiB; use aot_solver=knn (within 1% of exact, docs/aot-scale.md) or at most 8192'),
    (dict(batch=16, aot=0, nearest_of=1), 1, 4, 'nearest_of=1 is plain EDM noise; use nearest_of=K with K >= 2, or 0 for off'),
    (dict(batch=16, aot=16, nearest_of=4), 1, 4, 'nearest_of=4 and aot=16 are two couplings of noise to images; use aot=0 with nearest_of'),
])
def test_sizes_refused(changes, world, label_dim, message):
    err = refusal(config.check_sizes, options(**changes), label_dim, world, 100000)
    assert str(err) == message
    assert err.message(flag).startswith('--' + message.split('=')[0] + '=') # the program names the option

def test_sizes_named_as_a_program_names_them():
    err = refusal(config.check_sizes, options(batch=16, batch_gpu=6), 4, 1, 64)
    assert err.message(flag) == '--batch=16 over 1 GPU(s) is 16 per GPU, not a multiple of --batch_gpu=6'
    assert err.kind == 'batch'

def test_sizes_accepted(capsys):
    assert config.check_sizes(options(batch=32, batch_gpu=8, aot=16), 4, 2, 64) == 8
    assert config.check_sizes(options(batch=32, batch_gpu=None, aot=0), 0, 2, 64) == 16 # plain EDM: any per-GPU batch
    assert config.check_sizes(options(batch=16, batch_gpu=64, aot=16), 4, 1, 64) == 16 # at most the per-GPU batch
    # Large pools: exact with classes (each class is solved alone), knn without.
    assert config.check_sizes(options(batch=16, aot=16384, aot_solver='scipy'), 10, 1, 100000) == 16
    assert config.check_sizes(options(batch=16, aot=16384, aot_solver='knn'), 0, 1, 100000) == 16
    assert config.check_sizes(options(batch=16, aot=0, nearest_of=4), 4, 1, 64) == 16 # nearest-of-K: the other coupling
    assert capsys.readouterr().out == ''

def test_solver_without_its_package(monkeypatch):
    monkeypatch.setitem(sys.modules, 'lap', None) # import lap raises ImportError
    err = refusal(config.check_sizes, options(batch=16, aot=16, aot_solver='lap'), 4, 1, 64)
    assert str(err).startswith('aot_solver=lap: ') and 'pip install lap' in str(err)

def test_pool_larger_than_the_dataset_is_a_warning(capsys):
    assert config.check_sizes(options(batch=64, aot=256), 4, 1, 200, name=flag) == 64
    assert capsys.readouterr().out == ('Warning: --aot=256 is larger than the dataset (200 images): every pool holds some '
                                       'images more than once. Use --aot=192 or less for distinct images in a pool.\n')
    config.check_sizes(options(batch=64, aot=64), 4, 1, 40)
    assert capsys.readouterr().out == ('Warning: aot=64 is larger than the dataset (40 images): every pool holds some images '
                                       'more than once. No pool of distinct images is a multiple of the per-GPU batch 64; '
                                       'a smaller batch allows one.\n')

#----------------------------------------------------------------------------
# The dataset.

def dataset_kwargs(path, cond):
    return dnnlib.EasyDict(class_name='training.dataset.ImageFolderDataset', path=path, use_labels=cond)

def test_dataset_probed(data):
    kwargs = dataset_kwargs(data, True)
    name, interface = config.probe_dataset(kwargs, options(data=data, cond=True))
    assert name == 'data' and interface == dict(img_resolution=8, img_channels=3, label_dim=4)
    assert kwargs.resolution == 8 and kwargs.max_size == 64

def test_dataset_refused(tmp_path):
    plain = make_dataset(tmp_path / 'plain', n=8, labels=False)
    err = refusal(config.probe_dataset, dataset_kwargs(plain, True), options(data=plain, cond=True))
    assert err.message(flag) == f'--cond=1 requires labels, but {plain} has no dataset.json with labels; add one or use --cond=0'
    res12 = make_dataset(tmp_path / 'res12', n=8, res=12)
    with pytest.raises(OptionError, match='resolution 12 is not a power of two'):
        config.probe_dataset(dataset_kwargs(res12, False), options(data=res12))
    bad = tmp_path / 'bad.zip'
    bad.write_bytes(b'this is not a zip file')
    err = refusal(config.probe_dataset, dataset_kwargs(str(bad), False), options(data=str(bad)))
    assert err.kind == 'dataset' and str(err).startswith(f'Cannot use dataset data={bad}: ')
    wide = tmp_path / 'wide' # the dataset's ValueError
    wide.mkdir()
    for i in range(2):
        PIL.Image.new('RGB', (12, 8)).save(wide / f'img{i}.png')
    with pytest.raises(OptionError, match='training needs square images') as info: # and says how, with dataset_tool.py
        config.probe_dataset(dataset_kwargs(str(wide), False), options(data=str(wide)))
    assert str(info.value).startswith(f'Cannot use dataset data={wide}: ')
    damaged = make_dataset(tmp_path / 'damaged', n=8, labels=False)
    png = (tmp_path / 'damaged' / 'img0005.png').read_bytes()
    (tmp_path / 'damaged' / 'img0005.png').write_bytes(png[:len(png) // 2]) # the header reads, the pixels do not
    with pytest.raises(OptionError, match='cannot decode image img0005.png') as info: # found before the run folder exists
        config.probe_dataset(dataset_kwargs(damaged, False), options(data=damaged))
    assert str(info.value).startswith(f'Cannot use dataset data={damaged}: ')

#----------------------------------------------------------------------------
# The whole configuration.

def test_training_config(data, monkeypatch):
    monkeypatch.setattr(dist, 'use_cuda', lambda: False) # workers auto: one, as on the CPU
    c, desc = config.training_config(options(data=data, cond=True, batch=32, batch_gpu=8, aot=16, seed=5, workers='auto',
                                             cbase=8, cres=[1, 1], augment=0, desc='x'), world=2)
    assert desc == 'data-cond-ddpmpp-edm-gpus2-batch32-fp32-x'
    assert c.batch_size == 32 and c.batch_gpu == 8 and c.aot_pool == 16 and c.seed == 5
    assert c.network_kwargs.class_name == 'training.networks.EDMPrecond' and c.network_kwargs.model_channels == 8
    assert c.loss_kwargs.class_name == 'training.loss.EDMLoss' and 'augment_kwargs' not in c
    assert c.data_loader_kwargs == dict(pin_memory=False, num_workers=1, prefetch_factor=1, persistent_workers=True)
    c, _ = config.training_config(options(data=data, batch=16, aot=16, workers=0), world=1)
    assert c.data_loader_kwargs == dict(pin_memory=False, num_workers=0) and c.augment_kwargs.p == 0.12

def test_training_config_refusals(data):
    err = refusal(config.training_config, options(data=data, bf16=True, fp16=True), 1)
    assert err.message(flag) == '--bf16 and --fp16=1 are two kinds of mixed precision; choose one'
    err = refusal(config.training_config, options(data=data, batch=15), 2) # the checks of the sizes are made
    assert err.kind == 'batch'
