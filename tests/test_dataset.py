# training/dataset.py: EDM-format archives (folder or zip), labels, max_size, x-flip, cache,
# pickling and DataLoader workers, and clear errors for broken archives.

import json
import pickle
import zipfile
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from training.dataset import DamagedImageError, ImageFolderDataset

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / 'tests' / 'golden' / 'dataset'
CIFAR_ZIP = str(GOLDEN / 'cifar10-32x32.zip')
CIFAR_LABELS = [l for _, l in json.loads((GOLDEN / 'README.json').read_text())['files']['cifar10-32x32.zip']['dataset_json']['labels']]
CIFAR_IMAGES = np.load(GOLDEN / 'decoded.npz')['cifar_train_images'] # NHWC

def test_bundled_digits():
    ds = ImageFolderDataset(str(ROOT / 'datasets' / 'uci-digits-16x16.zip'), use_labels=True)
    assert ds.name == 'uci-digits-16x16'
    assert len(ds) == 1797
    assert ds.image_shape == [1, 16, 16] and ds.resolution == 16 and ds.num_channels == 1
    assert ds.has_labels and ds.label_dim == 10 and ds.has_onehot_labels
    img, label = ds[5]
    assert img.dtype == np.uint8 and img.shape == (1, 16, 16)
    assert label.dtype == np.float32 and label.sum() == 1 and label.argmax() == 5 # the file cycles 0..9 at first
    counts = np.bincount([int(ds.get_label(i).argmax()) for i in range(len(ds))], minlength=10)
    assert counts.min() >= 170 and counts.sum() == 1797
    # White ink on black: borders mostly dark, some pixels at full ink.
    assert img[0, 0].mean() < 64 and img.max() >= 200

@pytest.fixture(scope='module')
def cifar_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp('cifar') / 'cifar10-32x32'
    with zipfile.ZipFile(CIFAR_ZIP) as z:
        z.extractall(root)
    return str(root)

@pytest.mark.parametrize('kind', ['zip', 'dir'])
def test_reads_golden_archive(kind, cifar_dir):
    ds = ImageFolderDataset(CIFAR_ZIP if kind == 'zip' else cifar_dir, use_labels=True, resolution=32)
    assert ds.name == 'cifar10-32x32' and len(ds) == 30
    assert ds.image_shape == [3, 32, 32] and ds.label_shape == [10]
    for i in range(30):
        img, label = ds[i]
        np.testing.assert_array_equal(img, CIFAR_IMAGES[i].transpose(2, 0, 1))
        assert label.argmax() == CIFAR_LABELS[i] and label.sum() == 1

def test_without_labels():
    ds = ImageFolderDataset(CIFAR_ZIP)
    assert ds.label_shape == [0] and ds.label_dim == 0 and not ds.has_labels
    assert ds[0][1].shape == (0,) and ds[0][1].dtype == np.float32

def test_max_size_and_xflip():
    ds = ImageFolderDataset(CIFAR_ZIP, use_labels=True, max_size=10, random_seed=3, xflip=True)
    assert len(ds) == 20
    # EDM's subset: shuffle all indices with RandomState(seed), keep the first max_size, in order.
    expected = np.arange(30)
    np.random.RandomState(3).shuffle(expected)
    expected = np.sort(expected[:10])
    raw = expected.tolist()
    for i in range(10):
        a, la = ds[i]
        b, lb = ds[i + 10]
        np.testing.assert_array_equal(b, a[:, :, ::-1])
        np.testing.assert_array_equal(a, CIFAR_IMAGES[raw[i]].transpose(2, 0, 1))
        np.testing.assert_array_equal(la, lb)
        assert la.argmax() == CIFAR_LABELS[raw[i]]
    assert len(ImageFolderDataset(CIFAR_ZIP, max_size=100)) == 30

def test_cache_and_pickle():
    ds = ImageFolderDataset(CIFAR_ZIP, use_labels=True, cache=True)
    first = ds[4][0]
    assert 4 in ds._cached_images
    ds._cached_images[4][:] = 7 # the cached copy is what is served next time
    assert (ds[4][0] == 7).all() and not (first == 7).all()

    ds = ImageFolderDataset(CIFAR_ZIP, use_labels=True)
    ds[0] # opens the zip
    state = ds.__getstate__()
    assert state['_zipfile'] is None and state['_raw_labels'] is None
    clone = pickle.loads(pickle.dumps(ds))
    np.testing.assert_array_equal(clone[9][0], ds[9][0])
    np.testing.assert_array_equal(clone[9][1], ds[9][1])

def test_dataloader_workers_share_nothing():
    ds = ImageFolderDataset(CIFAR_ZIP, use_labels=True)
    ds[0] # parent opens the zip before forking workers
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, shuffle=False)
    images = torch.cat([x for x, _ in loader]).numpy()
    labels = torch.cat([y for _, y in loader]).numpy()
    np.testing.assert_array_equal(images, CIFAR_IMAGES.transpose(0, 3, 1, 2))
    assert labels.argmax(1).tolist() == CIFAR_LABELS

def test_float_labels(tmp_path):
    for i in range(3):
        PIL.Image.fromarray(np.full((4, 4), i, np.uint8)).save(tmp_path / f'{i}.png')
    (tmp_path / 'dataset.json').write_text(json.dumps({'labels': [[f'{i}.png', [i, 0.5]] for i in range(3)]}))
    ds = ImageFolderDataset(str(tmp_path), use_labels=True)
    assert ds.label_shape == [2] and not ds.has_onehot_labels
    np.testing.assert_array_equal(ds[2][1], np.array([2, 0.5], np.float32))
    assert ds[2][0].shape == (1, 4, 4) and ds[2][0].max() == 2

def test_class_names(tmp_path):
    """dataset.json's "class_names" (index = label) beside "labels": the same labels (EDM's loader reads
    only json['labels'] too), the names as Dataset.class_names; None without the key or labels."""
    with zipfile.ZipFile(CIFAR_ZIP) as z:
        z.extractall(tmp_path / 'named')
    meta = json.loads((tmp_path / 'named' / 'dataset.json').read_text())
    assert 'class_names' not in meta
    names = ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck']
    (tmp_path / 'named' / 'dataset.json').write_text(json.dumps(dict(meta, class_names=names)))
    plain, named = ImageFolderDataset(CIFAR_ZIP, use_labels=True), ImageFolderDataset(str(tmp_path / 'named'), use_labels=True)
    assert plain.class_names is None and named.class_names == names
    assert named.label_shape == plain.label_shape == [10]
    np.testing.assert_array_equal([named.get_label(i) for i in range(30)], [plain.get_label(i) for i in range(30)])
    edm_view = dict(json.loads((tmp_path / 'named' / 'dataset.json').read_text())['labels'])
    assert [edm_view[f] for f in named._image_fnames] == CIFAR_LABELS
    assert ImageFolderDataset(str(tmp_path / 'named')).class_names is None # use_labels=False: no labels, no names
    assert pickle.loads(pickle.dumps(named)).class_names == names # as a DataLoader worker gets it

    for bad in [names[:9], 'airplane', [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]]:
        (tmp_path / 'named' / 'dataset.json').write_text(json.dumps(dict(meta, class_names=bad)))
        with pytest.raises(IOError, match=r'dataset.json "class_names" must be a list of at least 10 strings, one per label; fix or remove it'):
            ImageFolderDataset(str(tmp_path / 'named'), use_labels=True)

#----------------------------------------------------------------------------
# Broken archives: IOError (which train.py and fid.py report in one line) naming the file.

def make_folder(path, sizes, labels=None, modes=None):
    """PNGs img0.png, ... of the given sizes (N or (width, height)) and PIL modes (default RGB)."""
    path.mkdir(parents=True, exist_ok=True)
    for i, s in enumerate(sizes):
        w, h = s if isinstance(s, tuple) else (s, s)
        PIL.Image.fromarray(np.zeros((h, w, 3), np.uint8)).convert(modes[i] if modes else 'RGB').save(path / f'img{i}.png')
    if labels is not None:
        (path / 'dataset.json').write_text(json.dumps({'labels': labels}))
    return path

def test_errors(tmp_path):
    with pytest.raises(IOError, match='no such directory or zip'):
        ImageFolderDataset(str(tmp_path / 'missing.zip'))
    (tmp_path / 'garbage.zip').write_bytes(b'this is not a zip')
    with pytest.raises(IOError, match='garbage.zip: not a valid zip'):
        ImageFolderDataset(str(tmp_path / 'garbage.zip'))
    (tmp_path / 'data.npz').write_bytes(b'x')
    with pytest.raises(IOError, match='not a directory or a .zip'):
        ImageFolderDataset(str(tmp_path / 'data.npz'))
    (tmp_path / 'empty').mkdir()
    (tmp_path / 'empty' / 'readme.txt').write_text('no images')
    with pytest.raises(IOError, match='no image files'):
        ImageFolderDataset(str(tmp_path / 'empty'))

    # Sizes are checked from the headers when the dataset is made, not when a worker meets the odd image.
    with pytest.raises(ValueError, match=r'img2\.png is 16x16x3, 2 other images are 8x8x3 \(1 image of another size\)'):
        ImageFolderDataset(str(make_folder(tmp_path / 'mixed', [8, 8, 16])))
    with pytest.raises(ValueError, match=r'img1\.png is 8x8x1, 2 other images are 8x8x3'):
        ImageFolderDataset(str(make_folder(tmp_path / 'gray', [8, 8, 8], modes='RGB L RGB'.split())))
    with pytest.raises(ValueError, match=r'img1\.png is 8x8x1, 2 other images are 8x8x3'):
        ImageFolderDataset(str(make_folder(tmp_path / 'palette', [8, 8, 8], modes='RGB P RGB'.split())))
    # Other formats are read by PIL: a JPEG of another size among PNGs.
    folder = make_folder(tmp_path / 'jpeg', [8, 8])
    PIL.Image.fromarray(np.zeros((6, 8, 3), np.uint8)).save(folder / 'img2.jpg')
    with pytest.raises(ValueError, match=r'img2\.jpg is 8x6x3, 2 other images are 8x8x3'):
        ImageFolderDataset(str(folder))
    (folder / 'img2.jpg').unlink()
    PIL.Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / 'img2.jpg')
    assert ImageFolderDataset(str(folder)).resolution == 8
    # Non-square images make a dataset (fid.py takes them), but one that cannot be trained on.
    wide = ImageFolderDataset(str(make_folder(tmp_path / 'wide', [(40, 30)] * 2)))
    assert wide.image_shape == [3, 30, 40]
    with pytest.raises(ValueError, match='images are 40x30 .*square'):
        wide.resolution
    with pytest.raises(IOError, match='expected 16x16'):
        ImageFolderDataset(str(make_folder(tmp_path / 'small', [8, 8])), resolution=16)

    # A file that changes after the check is still caught when it is read.
    ds = ImageFolderDataset(str(make_folder(tmp_path / 'changed', [8, 8, 8])))
    make_folder(tmp_path / 'changed', [8, 8, 16])
    with pytest.raises(IOError, match=r'img2\.png is 16x16x3, other images are 8x8x3'):
        ds[2]

    bad = make_folder(tmp_path / 'badpng', [8, 8])
    (bad / 'img1.png').write_bytes(b'\x89PNG\r\n\x1a\nbroken')
    with pytest.raises(IOError, match=r'cannot decode image img1\.png'):
        ImageFolderDataset(str(bad))[1]

    partial = make_folder(tmp_path / 'partial', [8, 8, 8], labels=[['img0.png', 0], ['img2.png', 1]])
    with pytest.raises(IOError, match=r'dataset.json has no label for img1\.png'):
        ImageFolderDataset(str(partial), use_labels=True)
    assert len(ImageFolderDataset(str(partial))) == 3 # labels are not read unless asked for

    negative = make_folder(tmp_path / 'negative', [8], labels=[['img0.png', -1]])
    with pytest.raises(IOError, match='non-negative integers'):
        ImageFolderDataset(str(negative), use_labels=True)
    broken = make_folder(tmp_path / 'brokenjson', [8])
    (broken / 'dataset.json').write_text('{"labels": [')
    with pytest.raises(IOError, match='cannot read labels from dataset.json'):
        ImageFolderDataset(str(broken), use_labels=True)

def truncate(path):
    """Cut a PNG short after its header: the size reads, the pixels do not."""
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])

def test_damaged_image_is_one_line_also_from_a_worker(tmp_path):
    folder = tmp_path / 'data'
    folder.mkdir()
    rnd = np.random.RandomState(0)
    for i in range(4):
        PIL.Image.fromarray(rnd.randint(0, 256, (8, 8, 3), np.uint8)).save(folder / f'img{i}.png')
    truncate(folder / 'img2.png')
    ds = ImageFolderDataset(str(folder)) # the header is intact: the size check passes
    ds[1]
    with pytest.raises(DamagedImageError) as direct:
        ds[2]
    message = str(direct.value)
    assert len(message.splitlines()) == 1
    assert message.startswith(f'{folder}: cannot decode image img2.png (') and f'dataset_tool.py --source={folder} ' in message
    # A DataLoader worker's error arrives in the main process as the same class and the same line.
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=1)
    with pytest.raises(DamagedImageError) as wrapped:
        next(iter(loader))
    assert str(wrapped.value) == message

@pytest.mark.parametrize('kind', ['dir', 'zip'])
def test_check_images_finds_every_damaged_image(tmp_path, kind):
    folder = tmp_path / 'data'
    folder.mkdir()
    rnd = np.random.RandomState(0)
    for i in range(6):
        PIL.Image.fromarray(rnd.randint(0, 256, (8, 8, 3), np.uint8)).save(folder / f'img{i}.png')
    path = folder
    if kind == 'zip':
        path = tmp_path / 'data.zip'
        with zipfile.ZipFile(path, 'w') as z:
            for i in range(6):
                z.write(folder / f'img{i}.png', f'img{i}.png')
    ImageFolderDataset(str(path)).check_images() # intact: no error

    for i in [1, 4]:
        truncate(folder / f'img{i}.png')
    if kind == 'zip':
        path = tmp_path / 'damaged.zip'
        with zipfile.ZipFile(path, 'w') as z:
            for i in range(6):
                z.write(folder / f'img{i}.png', f'img{i}.png')
    with pytest.raises(DamagedImageError) as err:
        ImageFolderDataset(str(path)).check_images()
    message = str(err.value)
    assert len(message.splitlines()) == 1
    assert message.startswith(f'{path}: cannot decode image img1.png (') and ') and 1 other image; remove or re-save them' in message
    assert f'dataset_tool.py --source={path} ' in message
    # Only the images in use: a subset without the damaged ones passes.
    subset = ImageFolderDataset(str(path), max_size=4, random_seed=7)
    assert subset._raw_idx.tolist() == [0, 2, 3, 5]
    subset.check_images()
