# dataset_tool.py: reproduces EDM's outputs (tests/golden/dataset/), reads every source type,
# and refuses bad input with a one-line error and nothing left behind.

import gzip
import io
import json
import os
import pickle
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / 'tests' / 'golden' / 'dataset'
import dataset_tool
from training.dataset import ImageFolderDataset

CIFAR_NAMES = ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck']
README = json.loads((GOLDEN / 'README.json').read_text())['files']
DECODED = np.load(GOLDEN / 'decoded.npz', allow_pickle=False)

def run_tool(*args):
    return CliRunner().invoke(dataset_tool.main, [str(a) for a in args])

def read_archive(path):
    """(entry names, dataset.json, decoded images as NHWC uint8) of a zip or folder archive."""
    if os.path.isdir(path):
        names = sorted(p.relative_to(path).as_posix() for p in Path(path).rglob('*') if p.is_file())
        read = lambda n: (Path(path) / n).read_bytes()
    else:
        z = zipfile.ZipFile(path)
        names = z.namelist()
        read = z.read
    images = [np.array(PIL.Image.open(io.BytesIO(read(n)))) for n in names if n.endswith('.png')]
    return names, json.loads(read('dataset.json')), np.stack(images)

def write_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.fromarray(array).save(path)

@pytest.fixture(scope='module')
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp('src') / 'imagefolder'
    with zipfile.ZipFile(GOLDEN / 'imagefolder_source.zip') as z:
        z.extractall(root)
    return root

def assert_leaves_nothing(tmp_path, before):
    assert sorted(os.listdir(tmp_path)) == before

#----------------------------------------------------------------------------
# Goldens.

def test_cifar10_golden(tmp_path):
    dest = tmp_path / 'cifar10-32x32.zip'
    res = run_tool('--source', GOLDEN / 'cifar-10-python.tar.gz', '--dest', dest)
    assert res.exit_code == 0, res.output
    assert res.output.rstrip().endswith(f'Wrote {dest}: 30 images, 32x32, 3 channels (RGB), 10 classes '
        '(0=airplane, 1=automobile, 2=bird, 3=cat, 4=deer, 5=dog, 6=frog, 7=horse, 8=ship, 9=truck)')
    ref = README['cifar10-32x32.zip']
    names, meta, images = read_archive(dest)
    assert names == ref['entries']
    # EDM's file plus the tarball's label names (batches.meta), which EDM's loader does not read.
    assert meta == dict(ref['dataset_json'], class_names=CIFAR_NAMES)
    assert all(info.compress_type == zipfile.ZIP_STORED for info in zipfile.ZipFile(dest).infolist())
    np.testing.assert_array_equal(images, DECODED['cifar_train_images'])
    assert [l for _, l in meta['labels']] == DECODED['cifar_train_labels'].tolist()

def jpeg_derived(source_order):
    """Indices of output images that come from JPEG files (decoders may differ by a few levels)."""
    return [i for i, p in enumerate(source_order) if p.endswith(('.jpg', '.jpeg'))]

@pytest.mark.parametrize('from_zip', [False, True])
def test_image_folder_golden(tmp_path, image_folder, from_zip):
    source = GOLDEN / 'imagefolder_source.zip' if from_zip else image_folder
    key, ref = ('zip16', README['imagefolder-16x16_from_zip.zip']) if from_zip else ('folder16', README['imagefolder-16x16.zip'])
    dest = tmp_path / 'out.zip'
    res = run_tool('--source', source, '--dest', dest, '--resolution=16x16', '--transform=center-crop')
    assert res.exit_code == 0, res.output
    names, meta, images = read_archive(dest)
    assert names == ref['entries']
    assert meta == ref['dataset_json']
    assert images.shape == (6, 16, 16, 3)

    # Source order: a folder by path components (misc/ < misc-2/), a zip by plain string order.
    paths = [im['path'] for im in README['imagefolder_source.zip']['images']]
    order = sorted(paths) if from_zip else [p.as_posix() for p in sorted(Path(p) for p in paths)]
    jpeg = jpeg_derived(order)
    assert len(jpeg) == 3
    diff = np.abs(images.astype(int) - DECODED[key + '_images']).reshape(6, -1).max(axis=1)
    for i in range(6):
        assert diff[i] <= (6 if i in jpeg else 0), (order[i], diff[i])

def test_default_options_on_folder_give_edm_error(tmp_path, image_folder):
    res = run_tool('--source', image_folder, '--dest', tmp_path / 'out.zip')
    assert res.exit_code != 0
    assert 'Image dimensions after scale and crop are required to be square.  Got 40x30' in res.output
    assert not (tmp_path / 'out.zip').exists() and os.listdir(tmp_path) == []

@pytest.mark.slow
def test_convert_spelling_and_reproducible_bytes(tmp_path):
    cmd = [sys.executable, str(ROOT / 'dataset_tool.py'), 'convert', f'--source={GOLDEN / "cifar-10-python.tar.gz"}', '--max-images=7']
    a = subprocess.run(cmd + [f'--dest={tmp_path / "a.zip"}'], capture_output=True, text=True)
    assert a.returncode == 0, a.stderr
    b = subprocess.run(cmd + [f'--dest={tmp_path / "b.zip"}'], capture_output=True, text=True)
    assert b.returncode == 0, b.stderr
    assert (tmp_path / 'a.zip').read_bytes() == (tmp_path / 'b.zip').read_bytes()
    assert len(zipfile.ZipFile(tmp_path / 'a.zip').namelist()) == 8 # 7 images + dataset.json

#----------------------------------------------------------------------------
# Other sources.

def make_mnist(folder, images, labels):
    folder.mkdir(parents=True, exist_ok=True)
    header = lambda *ints: b''.join(int(x).to_bytes(4, 'big') for x in ints)
    with gzip.open(folder / 'train-images-idx3-ubyte.gz', 'wb') as f:
        f.write(header(2051, len(images), 28, 28) + images.tobytes())
    with gzip.open(folder / 'train-labels-idx1-ubyte.gz', 'wb') as f:
        f.write(header(2049, len(labels)) + labels.tobytes())

@pytest.mark.parametrize('as_folder', [False, True])
def test_mnist(tmp_path, as_folder):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    make_mnist(tmp_path / 'mnist', images, labels)
    source = tmp_path / 'mnist' if as_folder else tmp_path / 'mnist' / 'train-images-idx3-ubyte.gz'
    res = run_tool('--source', source, '--dest', tmp_path / 'mnist-32x32.zip')
    assert res.exit_code == 0, res.output
    names, meta, out = read_archive(tmp_path / 'mnist-32x32.zip')
    assert out.shape == (5, 32, 32) # grayscale, padded by 2 as EDM
    np.testing.assert_array_equal(out[:, 2:30, 2:30], images)
    assert out[:, :2].max() == 0 and out[:, :, 30:].max() == 0
    assert [l for _, l in meta['labels']] == labels.tolist()
    assert meta['class_names'] == [str(d) for d in range(10)]

def test_mnist_without_labels_file(tmp_path):
    make_mnist(tmp_path / 'mnist', np.zeros((2, 28, 28), np.uint8), np.zeros(2, np.uint8))
    os.remove(tmp_path / 'mnist' / 'train-labels-idx1-ubyte.gz')
    res = run_tool('--source', tmp_path / 'mnist' / 'train-images-idx3-ubyte.gz', '--dest', tmp_path / 'out.zip')
    assert res.exit_code != 0 and 'train-labels-idx1-ubyte.gz' in res.output
    assert not (tmp_path / 'out.zip').exists()

def test_digits_csv(tmp_path):
    rows = np.zeros((3, 65), dtype=int)
    rows[0, :64] = 16                  # full ink
    rows[1, 9] = 8                     # one half-ink pixel at row 1, column 1
    rows[:, 64] = [7, 0, 9]
    src = tmp_path / 'digits.csv.gz'
    with gzip.open(src, 'wt') as f:
        f.write('\n'.join(','.join(map(str, r)) for r in rows) + '\n')
    res = run_tool('--source', src, '--dest', tmp_path / 'out')
    assert res.exit_code == 0, res.output
    assert res.output.rstrip().endswith(f'Wrote {tmp_path / "out"}: 3 images, 8x8, 1 channel (grayscale), 3 classes')
    names, meta, out = read_archive(tmp_path / 'out')
    assert out.shape == (3, 8, 8)
    assert (out[0] == 255).all() and out[1, 1, 1] == 128 and out[1].sum() == 128 and out[2].max() == 0
    assert [l for _, l in meta['labels']] == [7, 0, 9] and 'class_names' not in meta # the CSV names no classes
    assert PIL.Image.open(tmp_path / 'out' / '00000' / 'img00000000.png').mode == 'L'

def test_bundled_digits_source_rebuilds_the_bundled_archive(tmp_path):
    # The command of docs/datasets.md, from the files a fresh clone has.
    res = run_tool('--source', ROOT / 'datasets' / 'digits.csv.gz', '--dest', tmp_path / 'uci-digits-16x16.zip', '--resolution=16x16')
    assert res.exit_code == 0, res.output
    assert (tmp_path / 'uci-digits-16x16.zip').read_bytes() == (ROOT / 'datasets' / 'uci-digits-16x16.zip').read_bytes()

def test_labels_from_toplevel_folders_and_max_images(tmp_path):
    rng = np.random.default_rng(1)
    for cls in ['cats', 'dogs', 'zebras']:
        for i in range(2):
            write_png(tmp_path / 'src' / cls / f'{i}.png', rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    res = run_tool('--source', tmp_path / 'src', '--dest', tmp_path / 'out.zip', '--max-images=5')
    assert res.exit_code == 0, res.output
    names, meta, out = read_archive(tmp_path / 'out.zip')
    assert len(out) == 5
    assert [l for _, l in meta['labels']] == [0, 0, 1, 1, 2]
    assert meta['class_names'] == ['cats', 'dogs', 'zebras']
    np.testing.assert_array_equal(out[2], np.array(PIL.Image.open(tmp_path / 'src' / 'dogs' / '0.png')))
    assert res.output.rstrip().endswith('3 classes (0=cats, 1=dogs, 2=zebras)')

    # An archive as the source keeps its names, also for classes that --max-images leaves out.
    res = run_tool('--source', tmp_path / 'out.zip', '--dest', tmp_path / 'again', '--max-images=3')
    assert res.exit_code == 0, res.output
    _, meta, _ = read_archive(tmp_path / 'again')
    assert [l for _, l in meta['labels']] == [0, 0, 1] and meta['class_names'] == ['cats', 'dogs', 'zebras']
    ds = ImageFolderDataset(str(tmp_path / 'again'), use_labels=True)
    assert ds.label_dim == 2 and ds.class_names == ['cats', 'dogs', 'zebras']

def test_other_image_modes(tmp_path):
    """Palette and RGBA images become RGB, 16-bit grayscale is rescaled to 8 bits (not clipped)."""
    rgb = np.random.default_rng(2).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    PIL.Image.fromarray(rgb).convert('RGBA').save(tmp_path / 'a.png')
    PIL.Image.fromarray(rgb).convert('P').save(tmp_path / 'b.png')
    (tmp_path / 'src').mkdir()
    for name in ['a.png', 'b.png']:
        os.replace(tmp_path / name, tmp_path / 'src' / name)
    res = run_tool('--source', tmp_path / 'src', '--dest', tmp_path / 'rgb.zip')
    assert res.exit_code == 0, res.output
    _, _, out = read_archive(tmp_path / 'rgb.zip')
    np.testing.assert_array_equal(out[0], rgb)
    np.testing.assert_array_equal(out[1], np.array(PIL.Image.fromarray(rgb).convert('P').convert('RGB')))

    (tmp_path / 'src16').mkdir()
    PIL.Image.fromarray(np.array([[0, 257], [32896, 65535]], np.uint16)).save(tmp_path / 'src16' / 'a.png')
    res = run_tool('--source', tmp_path / 'src16', '--dest', tmp_path / 'gray.zip')
    assert res.exit_code == 0, res.output
    _, _, out = read_archive(tmp_path / 'gray.zip')
    np.testing.assert_array_equal(out[0], [[0, 1], [128, 255]])

def test_round_trip_into_dataset(tmp_path, image_folder):
    for dest in [tmp_path / 'out.zip', tmp_path / 'outdir']:
        res = run_tool('--source', image_folder, '--dest', dest, '--resolution=16x16', '--transform=center-crop')
        assert res.exit_code == 0, res.output
        ds = ImageFolderDataset(str(dest), use_labels=True)
        assert len(ds) == 6 and ds.image_shape == [3, 16, 16] and ds.label_dim == 5
        _, meta, images = read_archive(dest)
        for i in range(6):
            img, label = ds[i]
            np.testing.assert_array_equal(img, images[i].transpose(2, 0, 1))
            assert label.argmax() == meta['labels'][i][1]

#----------------------------------------------------------------------------
# Bad input: non-zero exit, one-line message, nothing written.

def bad_inputs(tmp_path, image_folder):
    (tmp_path / 'notes.txt').write_text('hello')
    (tmp_path / 'broken.zip').write_bytes(b'not a zip at all')
    write_png(tmp_path / 'mixed' / 'a.png', np.zeros((16, 16, 3), np.uint8))
    write_png(tmp_path / 'mixed' / 'b.png', np.zeros((32, 32, 3), np.uint8))
    write_png(tmp_path / 'badpng' / 'a.png', np.zeros((16, 16), np.uint8))
    (tmp_path / 'badpng' / 'b.png').write_bytes(b'\x89PNG\r\n\x1a\n garbage')
    write_png(tmp_path / 'badjson' / 'a.png', np.zeros((16, 16), np.uint8))
    (tmp_path / 'badjson' / 'dataset.json').write_text('{"labels": [["a.png", 0]')
    write_png(tmp_path / 'badnames' / 'a.png', np.zeros((16, 16), np.uint8))
    (tmp_path / 'badnames' / 'dataset.json').write_text('{"labels": [["a.png", 1]], "class_names": ["zero"]}')
    (tmp_path / 'existing.zip').write_bytes(b'keep me')
    (tmp_path / 'nonempty').mkdir()
    (tmp_path / 'nonempty' / 'file').write_text('keep me')
    evil = tmp_path / 'evil' / 'cifar-10-python.tar.gz'
    evil.parent.mkdir()
    with tarfile.open(evil, 'w:gz') as tar:
        payload = pickle.dumps({'data': print}) # any global outside numpy must be refused
        info = tarfile.TarInfo('cifar-10-batches-py/data_batch_1')
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    cifar = GOLDEN / 'cifar-10-python.tar.gz'
    return {
        'missing source':    (['--source', tmp_path / 'nope', '--dest', tmp_path / 'o.zip'], 'no such file'),
        'no images':         (['--source', tmp_path / 'evil', '--dest', tmp_path / 'new' / 'sub' / 'o.zip'], 'no images found'),
        'bad png, new dirs': (['--source', tmp_path / 'badpng', '--dest', tmp_path / 'new' / 'sub' / 'out'], 'b.png'),
        'unknown source':    (['--source', tmp_path / 'notes.txt', '--dest', tmp_path / 'o.zip'], 'unknown source type'),
        'not a zip':         (['--source', tmp_path / 'broken.zip', '--dest', tmp_path / 'o.zip'], 'not a valid zip'),
        'not square':        (['--source', cifar, '--dest', tmp_path / 'o.zip', '--resolution=32x16'], 'square'),
        'not power of two':  (['--source', cifar, '--dest', tmp_path / 'o.zip', '--resolution=24x24'], 'power-of-two'),
        'mixed sizes':       (['--source', tmp_path / 'mixed', '--dest', tmp_path / 'o.zip'], '--resolution'),
        'bad png':           (['--source', tmp_path / 'badpng', '--dest', tmp_path / 'o.zip'], 'b.png'),
        'bad dataset.json':  (['--source', tmp_path / 'badjson', '--dest', tmp_path / 'o.zip'], 'dataset.json must hold'),
        'too few names':     (['--source', tmp_path / 'badnames', '--dest', tmp_path / 'o.zip'], 'at least 2 strings, one per label'),
        'existing zip':      (['--source', cifar, '--dest', tmp_path / 'existing.zip'], 'already exists'),
        'non-empty folder':  (['--source', cifar, '--dest', tmp_path / 'nonempty'], 'not an empty folder'),
        'bad resolution':    (['--source', cifar, '--dest', tmp_path / 'o.zip', '--resolution=big'], 'WxH'),
        'crop needs size':   (['--source', cifar, '--dest', tmp_path / 'o.zip', '--transform=center-crop'], '--resolution'),
        'pickle with code':  (['--source', evil, '--dest', tmp_path / 'o.zip'], 'unexpected object builtins.print'),
    }

def test_bad_inputs(tmp_path, image_folder):
    cases = bad_inputs(tmp_path, image_folder)
    for name, (args, expected) in cases.items():
        before = sorted(os.listdir(tmp_path))
        res = run_tool(*args)
        assert res.exit_code not in (0, None) and not isinstance(res.exception, (AssertionError, TypeError, KeyError)), (name, res.output)
        lines = [l for l in res.output.splitlines() if l.startswith('Error')]
        assert len(lines) == 1 and expected in lines[0], (name, res.output)
        assert sorted(os.listdir(tmp_path)) == before, name # no dest, no temporary files
    assert (tmp_path / 'existing.zip').read_bytes() == b'keep me'
    assert os.listdir(tmp_path / 'nonempty') == ['file']

@pytest.mark.parametrize('as_zip', [False, True])
def test_every_damaged_image_is_listed_at_once(tmp_path, as_zip):
    source = tmp_path / 'photos'
    rnd = np.random.RandomState(0)
    for name in ['a.png', 'b.png', 'c.png', 'd.png']:
        write_png(source / name, rnd.randint(0, 256, (8, 8, 3), np.uint8))
    for name in ['b.png', 'd.png']: # cut short after the header: the size reads, the pixels do not
        data = (source / name).read_bytes()
        (source / name).write_bytes(data[:len(data) // 2])
    if as_zip:
        with zipfile.ZipFile(tmp_path / 'photos.zip', 'w') as z:
            for name in ['a.png', 'b.png', 'c.png', 'd.png']:
                z.write(source / name, name)
        source = tmp_path / 'photos.zip'
    before = sorted(os.listdir(tmp_path))
    res = run_tool('--source', source, '--dest', tmp_path / 'out.zip')
    assert res.exit_code == 1
    lines = res.stderr.strip().splitlines()
    damaged = [l for l in lines if l.startswith('Damaged image')]
    assert len(damaged) == 2 and 'b.png: ' in damaged[0] and 'd.png: ' in damaged[1] and 'truncated' in damaged[0], res.stderr
    assert lines[-1].startswith(f'Error: 2 damaged images in --source {source} (first: ') and 'b.png)' in lines[-1], res.stderr
    assert sum(l.startswith('Error') for l in lines) == 1
    assert sorted(os.listdir(tmp_path)) == before # no --dest, no temporary file

def test_lmdb_missing_package_message(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, 'lmdb', None) # makes `import lmdb` fail
    (tmp_path / 'bedroom_lmdb').mkdir()
    res = run_tool('--source', tmp_path / 'bedroom_lmdb', '--dest', tmp_path / 'o.zip')
    assert res.exit_code != 0 and 'pip install lmdb' in res.output
    assert os.listdir(tmp_path) == ['bedroom_lmdb']

def test_lmdb_source(tmp_path):
    lmdb = pytest.importorskip('lmdb', reason='the lmdb package is not installed; LSUN reading is untested here')
    env = lmdb.open(str(tmp_path / 'bedroom_lmdb'), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for i in range(3):
            png = io.BytesIO()
            PIL.Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(png, format='png')
            txn.put(f'{i:04d}'.encode(), png.getvalue())
    env.close()
    res = run_tool('--source', tmp_path / 'bedroom_lmdb', '--dest', tmp_path / 'o.zip')
    assert res.exit_code == 0, res.output
    _, meta, out = read_archive(tmp_path / 'o.zip')
    assert out.shape == (3, 8, 8, 3) and meta['labels'] is None and out[2].min() == 80
