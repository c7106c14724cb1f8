"""Make dataset archives in EDM's format: a folder or an uncompressed zip of PNGs
(00000/img00000000.png, ...) plus dataset.json with {"labels": [[name, label], ...]} and, where the
source names its classes, "class_names": [name of label 0, ...] (EDM's loader reads only "labels").

Reads the CIFAR-10 python tarball, MNIST idx gz, image folders and zips, LSUN lmdb folders
(needs the `lmdb` package) and the UCI handwritten digits CSV. The newer spelling
`dataset_tool.py convert --source ... --dest ...` is accepted as well."""

import functools
import gzip
import io
import json
import os
import pickle
import re
import shutil
import sys
import tarfile
import tempfile
import warnings
import zipfile
from pathlib import Path

import click
import numpy as np
import PIL.Image
from tqdm import tqdm

import dnnlib
from training.dataset import DamagedImageError, class_list, class_names_error

#----------------------------------------------------------------------------
# Helpers.

def is_image_ext(fname):
    PIL.Image.init()
    return os.path.splitext(str(fname))[1].lower() in PIL.Image.EXTENSION

def decode_image(file, name):
    """Decode one image file to a uint8 HW (grayscale) or HWC (RGB) array; DamagedImageError if it does not decode."""
    try:
        img = PIL.Image.open(file)
        img.load()
    except Exception as err:
        raise DamagedImageError(f'{name}: {" ".join(str(err).split()) or type(err).__name__}')
    if img.mode == 'I' or img.mode.startswith('I;16'): # 16-bit grayscale: rescale (Pillow's convert would clip)
        return ((np.array(img).astype(np.int64).clip(0, 65535) * 255 + 32767) // 65535).astype(np.uint8)
    if img.mode == 'F':
        raise click.ClickException(f'Image {name} has floating-point pixels; save it as 8- or 16-bit PNG first')
    if img.mode in ('1', 'LA'):
        img = img.convert('L')
    elif img.mode not in ('L', 'RGB'):
        img = img.convert('RGB') # palette, RGBA, CMYK, ...
    return np.array(img)

def labels_for_files(arch_fnames, meta, source):
    """({file: label}, class names or None) from dataset.json when present, else from top-level folder
    names (when there are several; label = index of the name in sorted order)."""
    if meta is not None:
        try:
            meta = json.loads(meta)
            labels, class_names = meta['labels'], meta.get('class_names')
            labels = dict(labels) if labels is not None else {}
            count = max((x + 1 for x in labels.values() if isinstance(x, int)), default=0)
            if class_names is not None and (error := class_names_error(class_names, count)):
                raise TypeError(error)
            return labels, class_names if labels else None
        except (ValueError, KeyError, TypeError) as err:
            raise click.ClickException(f'{source}: dataset.json must hold {{"labels": [[name, label], ...]}} '
                f'and optionally {{"class_names": [name, ...]}} ({err!r})')
    toplevel = {f: f.split('/')[0] if '/' in f else '' for f in arch_fnames}
    class_names = sorted(set(toplevel.values()))
    if len(class_names) > 1:
        classes = {name: idx for idx, name in enumerate(class_names)}
        return {f: classes[name] for f, name in toplevel.items()}, class_names
    return {}, None

class NumpyOnlyUnpickler(pickle.Unpickler):
    """CIFAR-10 batches are pickles: allow only what they need (numpy arrays), so no code runs."""
    allowed = {('numpy.core.multiarray', '_reconstruct'), ('numpy._core.multiarray', '_reconstruct'),
        ('numpy', 'ndarray'), ('numpy', 'dtype')}
    def find_class(self, module, name):
        if (module, name) not in self.allowed:
            raise pickle.UnpicklingError(f'unexpected object {module}.{name}')
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', DeprecationWarning) # numpy.core is an alias in numpy 2
            return super().find_class(module, name)

#----------------------------------------------------------------------------
# Sources. Each returns (number of images, iterator of dict(img=uint8 HW or HWC, label=int or None, name=str),
# class names: [name of label 0, ...] or None);
# a file that does not decode comes as dict(img=None, damage=reason, ...), so that all of them are reported at once.

def decode_entry(file, name, label):
    try:
        return dict(img=decode_image(file, name), label=label, name=name)
    except DamagedImageError as err:
        return dict(img=None, damage=str(err), label=label, name=name)

def open_image_folder(source_dir, *, max_images):
    # sorted(Path.rglob) orders by path components (misc/ before misc-2/), as EDM does.
    input_images = [f for f in sorted(Path(source_dir).rglob('*')) if is_image_ext(f) and f.is_file()]
    arch_fnames = {f: f.relative_to(source_dir).as_posix() for f in input_images}
    meta_path = os.path.join(source_dir, 'dataset.json')
    meta = Path(meta_path).read_text(encoding='utf8') if os.path.isfile(meta_path) else None
    labels, class_names = labels_for_files(arch_fnames.values(), meta, source_dir)
    input_images = input_images[:max_images]

    def iterate_images():
        for fname in input_images:
            with open(fname, 'rb') as file:
                yield decode_entry(file, str(fname), labels.get(arch_fnames[fname]))
    return len(input_images), iterate_images(), class_names

def open_image_zip(source, *, max_images):
    try:
        with zipfile.ZipFile(source, mode='r') as z:
            # Plain string order (misc-2/ before misc/), as EDM does.
            input_images = [f for f in sorted(z.namelist()) if is_image_ext(f)]
            meta = z.read('dataset.json').decode('utf8') if 'dataset.json' in z.namelist() else None
    except zipfile.BadZipFile as err:
        raise click.ClickException(f'--source {source}: not a valid zip file ({err})')
    labels, class_names = labels_for_files(input_images, meta, source)
    input_images = input_images[:max_images]

    def iterate_images():
        with zipfile.ZipFile(source, mode='r') as z:
            for fname in input_images:
                with z.open(fname, 'r') as file:
                    yield decode_entry(file, f'{source}:{fname}', labels.get(fname))
    return len(input_images), iterate_images(), class_names

def open_lmdb(lmdb_dir, *, max_images):
    try:
        import lmdb
    except ImportError:
        raise click.ClickException(f'--source {lmdb_dir}: reading LSUN lmdb needs the lmdb package; run: pip install lmdb')
    with lmdb.open(lmdb_dir, readonly=True, lock=False).begin(write=False) as txn:
        num = txn.stat()['entries'] if max_images is None else min(txn.stat()['entries'], max_images)

    def iterate_images():
        with lmdb.open(lmdb_dir, readonly=True, lock=False).begin(write=False) as txn:
            for idx, (key, value) in enumerate(txn.cursor()):
                if idx >= num:
                    break
                name = f'{lmdb_dir}:{key.decode(errors="replace")}'
                try:
                    img = np.array(PIL.Image.open(io.BytesIO(value)).convert('RGB'))
                except Exception as err: # LSUN has a few broken records; EDM skips them too
                    tqdm.write(f'Skipping undecodable image {name}: {err}')
                    continue
                yield dict(img=img, label=None, name=name)
    return num, iterate_images(), None

def array_source(images, labels, max_images, name, class_names=None):
    """A source over in-memory uint8 images and integer labels; name(idx) names image idx in errors."""
    num = len(images) if max_images is None else min(len(images), max_images)
    def iterate_images():
        for idx in range(num):
            yield dict(img=images[idx], label=int(labels[idx]), name=name(idx))
    return num, iterate_images(), class_names

def open_cifar10(tarball, *, max_images):
    images, labels = [], []
    try:
        with tarfile.open(tarball, 'r:gz') as tar:
            for batch in range(1, 6):
                with tar.extractfile(f'cifar-10-batches-py/data_batch_{batch}') as file:
                    data = NumpyOnlyUnpickler(file, encoding='latin1').load()
                images.append(np.asarray(data['data'], dtype=np.uint8).reshape(-1, 3, 32, 32))
                labels.append(np.asarray(data['labels'], dtype=np.int64))
            with tar.extractfile('cifar-10-batches-py/batches.meta') as file:
                class_names = [str(x) for x in NumpyOnlyUnpickler(file, encoding='latin1').load()['label_names']]
    except (tarfile.TarError, KeyError, OSError, EOFError, ValueError, pickle.UnpicklingError) as err:
        raise click.ClickException(f'--source {tarball}: not a CIFAR-10 python tarball (cifar-10-python.tar.gz): {err}')
    images = np.concatenate(images).transpose([0, 2, 3, 1]) # NCHW => NHWC
    labels = np.concatenate(labels)
    if len(images) != len(labels):
        raise click.ClickException(f'--source {tarball}: {len(images)} images but {len(labels)} labels')
    return array_source(images, labels, max_images, lambda idx: f'{tarball}:{idx}', class_names)

def read_idx_gz(path, magic, what):
    try:
        with gzip.open(path, 'rb') as f:
            data = f.read()
    except OSError as err:
        raise click.ClickException(f'Cannot read MNIST {what} {path}: {err}')
    if len(data) < 8 or int.from_bytes(data[:4], 'big') != magic:
        raise click.ClickException(f'{path} is not an MNIST idx {what} file (wrong magic number)')
    return data

def open_mnist(images_gz, *, max_images):
    labels_gz = images_gz.replace('-images-idx3-ubyte.gz', '-labels-idx1-ubyte.gz')
    if not os.path.isfile(labels_gz):
        raise click.ClickException(f'MNIST labels {labels_gz} not found; put it next to {images_gz}')
    data = read_idx_gz(images_gz, 2051, 'images')
    count, rows, cols = (int.from_bytes(data[i:i+4], 'big') for i in (4, 8, 12))
    images = np.frombuffer(data, np.uint8, offset=16)
    labels = np.frombuffer(read_idx_gz(labels_gz, 2049, 'labels'), np.uint8, offset=8)
    if images.size != count * rows * cols or len(labels) != count:
        raise click.ClickException(f'{images_gz}: header says {count} images of {rows}x{cols}, '
            f'found {images.size} pixels and {len(labels)} labels')
    images = images.reshape(-1, rows, cols)
    images = np.pad(images, [(0, 0), (2, 2), (2, 2)], 'constant', constant_values=0) # 28x28 => 32x32, as EDM
    return array_source(images, labels, max_images, lambda idx: f'{images_gz}:{idx}', [str(x) for x in range(10)])

def open_digits_csv(path, *, max_images):
    """UCI handwritten digits as distributed by scikit-learn: per line 64 pixels (0..16, 8x8 row-major) and the label."""
    try:
        with (gzip.open(path, 'rt') if path.endswith('.gz') else open(path, 'r')) as f:
            rows = np.loadtxt(f, delimiter=',', ndmin=2)
    except (OSError, ValueError) as err:
        raise click.ClickException(f'--source {path}: cannot parse digits CSV: {err}')
    if rows.shape[1] != 65 or rows[:, :64].min() < 0 or rows[:, :64].max() > 16 or np.any(rows != np.round(rows)):
        raise click.ClickException(f'--source {path}: expected lines of 64 integer pixels in 0..16 and a label, got {rows.shape[1]} columns')
    images = np.rint(rows[:, :64] * 255 / 16).astype(np.uint8).reshape(-1, 8, 8) # ink is white on black
    labels = rows[:, 64].astype(np.int64)
    return array_source(images, labels, max_images, lambda idx: f'{path}:line {idx + 1}')

def open_dataset(source, *, max_images):
    if os.path.isdir(source):
        if source.rstrip('/\\').endswith('_lmdb') or os.path.isfile(os.path.join(source, 'data.mdb')):
            return open_lmdb(source, max_images=max_images)
        if os.path.isfile(os.path.join(source, 'train-images-idx3-ubyte.gz')):
            return open_mnist(os.path.join(source, 'train-images-idx3-ubyte.gz'), max_images=max_images)
        return open_image_folder(source, max_images=max_images)
    if os.path.isfile(source):
        base = os.path.basename(source).lower()
        if base.endswith(('.tar.gz', '.tgz')):
            return open_cifar10(source, max_images=max_images)
        if base.endswith('-images-idx3-ubyte.gz'):
            return open_mnist(source, max_images=max_images)
        if base.endswith('.zip'):
            return open_image_zip(source, max_images=max_images)
        if base.endswith(('.csv', '.csv.gz')):
            return open_digits_csv(source, max_images=max_images)
        raise click.ClickException(f'--source {source}: unknown source type; expected an image folder, a .zip of images, '
            'cifar-10-python.tar.gz, train-images-idx3-ubyte.gz, an LSUN *_lmdb folder or a digits .csv[.gz]')
    raise click.ClickException(f'--source {source}: no such file or directory')

#----------------------------------------------------------------------------
# Transforms (as EDM): plain rescale, center crop, or wide center crop into a square canvas.

def scale(width, height, img):
    if (width is None or width == img.shape[1]) and (height is None or height == img.shape[0]):
        return img
    img = PIL.Image.fromarray(img)
    img = img.resize((width or img.width, height or img.height), PIL.Image.LANCZOS)
    return np.array(img)

def center_crop(width, height, img):
    crop = np.min(img.shape[:2])
    img = img[(img.shape[0] - crop) // 2 : (img.shape[0] + crop) // 2, (img.shape[1] - crop) // 2 : (img.shape[1] + crop) // 2]
    if img.ndim == 2:
        img = img[:, :, np.newaxis].repeat(3, axis=2)
    img = PIL.Image.fromarray(img, 'RGB').resize((width, height), PIL.Image.LANCZOS)
    return np.array(img)

def center_crop_wide(width, height, img):
    ch = int(np.round(width * img.shape[0] / img.shape[1]))
    if img.shape[1] < width or ch < height:
        return None # too small: skipped, as EDM does
    img = img[(img.shape[0] - ch) // 2 : (img.shape[0] + ch) // 2]
    if img.ndim == 2:
        img = img[:, :, np.newaxis].repeat(3, axis=2)
    img = np.array(PIL.Image.fromarray(img, 'RGB').resize((width, height), PIL.Image.LANCZOS))
    canvas = np.zeros([width, width, 3], dtype=np.uint8)
    canvas[(width - height) // 2 : (width + height) // 2, :] = img
    return canvas

def make_transform(transform, width, height):
    if transform is None:
        return functools.partial(scale, width, height)
    if width is None or height is None:
        raise click.UsageError(f'--transform={transform} needs --resolution=WxH')
    return functools.partial({'center-crop': center_crop, 'center-crop-wide': center_crop_wide}[transform], width, height)

def check_output_size(width, height):
    if width != height:
        raise click.ClickException(f'Image dimensions after scale and crop are required to be square.  Got {width}x{height}; '
            'use --resolution=NxN with --transform=center-crop (or center-crop-wide)')
    if width < 1 or width & (width - 1) != 0:
        raise click.ClickException(f'Image width/height after scale and crop are required to be power-of-two.  Got {width}x{height}; '
            'use e.g. --resolution=32x32')

#----------------------------------------------------------------------------
# Destination: written under a temporary name, renamed when complete.

def open_dest(dest):
    """Returns (save_bytes(archive_fname, data), commit(), abort())."""
    is_zip = dest.lower().endswith('.zip')
    if is_zip and os.path.exists(dest):
        raise click.ClickException(f'--dest {dest} already exists; delete it or choose another name')
    if not is_zip and os.path.exists(dest) and not (os.path.isdir(dest) and len(os.listdir(dest)) == 0):
        raise click.ClickException(f'--dest {dest} already exists and is not an empty folder; delete it or choose another name')
    umask = dnnlib.util.current_umask()
    parent = os.path.dirname(os.path.abspath(dest))
    new_dirs = [] # parent folders this run creates, removed again on failure
    d = parent
    while not os.path.isdir(d):
        new_dirs.append(d)
        d = os.path.dirname(d)
    os.makedirs(parent, exist_ok=True)
    def remove_new_dirs():
        for d in new_dirs:
            os.rmdir(d)

    if is_zip:
        fd, tmp = tempfile.mkstemp(dir=parent, prefix=os.path.basename(dest) + '.', suffix='.tmp')
        os.close(fd)
        zf = zipfile.ZipFile(tmp, mode='w', compression=zipfile.ZIP_STORED)
        def save_bytes(fname, data):
            # Fixed timestamps and permissions: the same command makes the same archive.
            info = zipfile.ZipInfo(fname, date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            zf.writestr(info, data, compress_type=zipfile.ZIP_STORED)
        def commit():
            zf.close()
            os.chmod(tmp, 0o666 & ~umask) # mkstemp made it private
            os.replace(tmp, dest)
        def abort():
            zf.close()
            os.remove(tmp)
            remove_new_dirs()
        return save_bytes, commit, abort

    tmp = tempfile.mkdtemp(dir=parent, prefix=os.path.basename(os.path.abspath(dest)) + '.', suffix='.tmp')
    def save_bytes(fname, data):
        path = os.path.join(tmp, fname)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, 'wb') as f:
            f.write(data.encode('utf8') if isinstance(data, str) else data)
    def commit():
        os.chmod(tmp, 0o777 & ~umask) # mkdtemp made it private
        if os.path.isdir(dest):
            os.rmdir(dest)
        os.replace(tmp, dest)
    def abort():
        shutil.rmtree(tmp, ignore_errors=True)
        remove_new_dirs()
    return save_bytes, commit, abort

#----------------------------------------------------------------------------

def parse_resolution(ctx, param, value):
    if value is None:
        return None, None
    m = re.fullmatch(r'(\d+)[x,](\d+)', value)
    if not m:
        raise click.BadParameter(f'expected WxH, e.g. 32x32, got {value!r}')
    return int(m.group(1)), int(m.group(2))

@click.command()
@click.option('--source',     help='Input: image folder, zip, CIFAR-10 tarball, MNIST gz, LSUN lmdb or digits CSV', metavar='PATH', required=True)
@click.option('--dest',       help='Output: folder or .zip archive', metavar='PATH', required=True)
@click.option('--max-images', help='Maximum number of images to output', metavar='INT', type=click.IntRange(min=1))
@click.option('--transform',  help='Input crop/resize mode', type=click.Choice(['center-crop', 'center-crop-wide']))
@click.option('--resolution', help='Output resolution (e.g., 32x32)', metavar='WxH', callback=parse_resolution)

def main(source, dest, max_images, transform, resolution):
    """Convert an image dataset into a dataset archive usable with EDM's train.py and fid.py.

    \b
    Examples:
    python dataset_tool.py --source=downloads/cifar10/cifar-10-python.tar.gz \\
        --dest=datasets/cifar10-32x32.zip
    python dataset_tool.py --source=downloads/mnist/train-images-idx3-ubyte.gz \\
        --dest=datasets/mnist-32x32.zip
    python dataset_tool.py --source=downloads/afhqv2 --dest=datasets/afhqv2-64x64.zip \\
        --resolution=64x64 --transform=center-crop
    python dataset_tool.py --source=datasets/digits.csv.gz --dest=uci-digits-16x16.zip \\
        --resolution=16x16
    """
    if dest == '':
        raise click.UsageError('--dest must not be empty')
    width, height = resolution
    if width is not None:
        check_output_size(width, width if transform == 'center-crop-wide' else height)
    transform_image = make_transform(transform, width, height)
    save_bytes, commit, abort = open_dest(dest)

    try:
        num_files, input_iter, class_names = open_dataset(source, max_images=max_images)
        if num_files == 0:
            raise click.ClickException(f'--source {source}: no images found')
        dataset_attrs = None
        labels = []
        damaged = []
        for idx, image in tqdm(enumerate(input_iter), total=num_files, unit='img'):
            if image['img'] is None:
                damaged.append(image)
                continue
            idx_str = f'{idx:08d}'
            archive_fname = f'{idx_str[:5]}/img{idx_str}.png'
            img = transform_image(image['img'])
            if img is None:
                continue
            channels = img.shape[2] if img.ndim == 3 else 1
            cur_attrs = (img.shape[1], img.shape[0], channels)
            if dataset_attrs is None:
                dataset_attrs = cur_attrs
                check_output_size(img.shape[1], img.shape[0])
                if channels not in (1, 3):
                    raise click.ClickException(f'{image["name"]}: images must be RGB or grayscale, got {channels} channels')
            elif cur_attrs != dataset_attrs:
                raise click.ClickException('Image {} ({}) is {}x{}x{}, earlier images are {}x{}x{}; '.format(archive_fname, image['name'], *cur_attrs, *dataset_attrs)
                    + 'use --resolution=WxH (with --transform=center-crop for non-square inputs) to give all images one shape')
            png = io.BytesIO()
            PIL.Image.fromarray(img, {1: 'L', 3: 'RGB'}[channels]).save(png, format='png', compress_level=0, optimize=False)
            save_bytes(archive_fname, png.getbuffer())
            labels.append([archive_fname, image['label']] if image['label'] is not None else None)

        if damaged:
            for image in damaged:
                click.echo(f'Damaged image {image["damage"]}', err=True)
            raise click.ClickException(f'{len(damaged)} damaged image{"s" if len(damaged) > 1 else ""} in --source {source} '
                f'(first: {damaged[0]["name"]}), listed above; '
                'remove or replace them and run again (nothing was written to --dest)')
        if dataset_attrs is None:
            raise click.ClickException(f'--source {source}: no image survived --transform={transform}; try a smaller --resolution')
        if 0 < sum(x is None for x in labels) < len(labels):
            tqdm.write(f'Warning: {sum(x is None for x in labels)} of {len(labels)} images have no label; writing dataset.json without labels')
        metadata = {'labels': labels if all(x is not None for x in labels) else None}
        if metadata['labels'] and class_names is not None:
            metadata['class_names'] = class_names # index = label; EDM's loader ignores the key
        save_bytes('dataset.json', json.dumps(metadata))
    except BaseException:
        abort()
        raise
    commit()
    width, height, channels = dataset_attrs
    classes = len({label for _, label in labels}) if metadata['labels'] else 0
    names = metadata.get('class_names')
    print(f'Wrote {dest}: {len(labels)} images, {width}x{height}, {channels} channel{"s" if channels > 1 else ""} '
        f'({"RGB" if channels == 3 else "grayscale"}), ' + (f'{classes} classes' if classes else 'no labels')
        + (f' ({class_list(names)})' if names else ''))

#----------------------------------------------------------------------------

if __name__ == '__main__':
    args = sys.argv[1:]
    if args[:1] == ['convert']: # spelling of the newer (EDM2) dataset_tool.py
        args = args[1:]
    main(args)

#----------------------------------------------------------------------------
