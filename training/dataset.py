# Datasets in EDM's archive format: a folder or uncompressed zip of PNGs (or other images that
# Pillow reads) plus an optional dataset.json with {"labels": [[name, label], ...]} and, in archives
# of this dataset_tool.py, "class_names": [name of label 0, ...] (EDM reads only "labels").
# Errors about the data are raised as IOError (unreadable; DamagedImageError for an image file that
# does not decode) or ValueError (images of different sizes; `resolution` of non-square images) so
# that programs can report them in one line.

import io
import os
import json
import shlex
import struct
import zipfile
import numpy as np
import PIL.Image
import torch

try:
    import pyspng # optional: faster PNG decoding
except ImportError:
    pyspng = None

#----------------------------------------------------------------------------

class DamagedImageError(IOError):
    """An image file that does not decode (truncated, corrupt), in a one-line message. A DataLoader
    worker's exception reaches the main process re-raised as type(err)(the worker's whole formatted
    traceback); this constructor keeps only the original message, its last line, so str(err) is the
    same line whether the error is caught in the process that read the file or in another."""

    def __init__(self, message):
        lines = str(message).strip().splitlines()
        tail = f'{DamagedImageError.__name__}: '
        if len(lines) > 1 and tail in lines[-1]:
            message = lines[-1].split(tail, 1)[1]
        super().__init__(message)

#----------------------------------------------------------------------------
# Abstract base class: index bookkeeping (max_size, x-flip), labels and caching.
# Subclasses provide _load_raw_image(raw_idx) and _load_raw_labels().

class Dataset(torch.utils.data.Dataset):
    def __init__(self,
        name,                   # Name of the dataset.
        raw_shape,              # Shape of the raw image data (NCHW).
        max_size    = None,     # Artificially limit the size of the dataset. None = no limit.
        use_labels  = False,    # Enable conditioning labels? False = label dimension is zero.
        xflip       = False,    # Artificially double the size of the dataset via x-flips.
        random_seed = 0,        # Random seed to use when applying max_size.
        cache       = False,    # Cache images in CPU memory?
    ):
        self._name = name
        self._raw_shape = list(raw_shape)
        self._use_labels = use_labels
        self._cache = cache
        self._cached_images = dict() # {raw_idx: np.ndarray, ...}
        self._raw_labels = None
        self._label_shape = None
        self._class_names = None # set by _load_raw_labels where the data names its classes

        # Apply max_size: a random subset chosen by random_seed, kept in the original order.
        self._raw_idx = np.arange(self._raw_shape[0], dtype=np.int64)
        if (max_size is not None) and (self._raw_idx.size > max_size):
            np.random.RandomState(random_seed % (1 << 31)).shuffle(self._raw_idx)
            self._raw_idx = np.sort(self._raw_idx[:max_size])

        # Apply xflip: every image appears twice, the second time mirrored.
        self._xflip = np.zeros(self._raw_idx.size, dtype=np.uint8)
        if xflip:
            self._raw_idx = np.tile(self._raw_idx, 2)
            self._xflip = np.concatenate([self._xflip, np.ones_like(self._xflip)])

    def _get_raw_labels(self):
        if self._raw_labels is None:
            self._raw_labels = self._load_raw_labels() if self._use_labels else None
            if self._raw_labels is None:
                self._raw_labels = np.zeros([self._raw_shape[0], 0], dtype=np.float32)
            assert isinstance(self._raw_labels, np.ndarray)
            assert self._raw_labels.shape[0] == self._raw_shape[0]
            assert self._raw_labels.dtype in [np.float32, np.int64]
        return self._raw_labels

    def close(self): # to be overridden by subclass
        pass

    def _load_raw_image(self, raw_idx): # to be overridden by subclass
        raise NotImplementedError

    def _load_raw_labels(self): # to be overridden by subclass
        raise NotImplementedError

    def __getstate__(self):
        return dict(self.__dict__, _raw_labels=None)

    def __del__(self):
        try:
            self.close()
        except:
            pass

    def __len__(self):
        return self._raw_idx.size

    def __getitem__(self, idx):
        raw_idx = self._raw_idx[idx]
        image = self._cached_images.get(raw_idx, None)
        if image is None:
            image = self._load_raw_image(raw_idx)
            if self._cache:
                self._cached_images[raw_idx] = image
        assert isinstance(image, np.ndarray) and image.dtype == np.uint8
        if self._xflip[idx]:
            image = image[:, :, ::-1]
        return image.copy(), self.get_label(idx)

    def get_label(self, idx):
        label = self._get_raw_labels()[self._raw_idx[idx]]
        if label.dtype == np.int64:
            onehot = np.zeros(self.label_shape, dtype=np.float32)
            onehot[label] = 1
            label = onehot
        return label.copy()

    @property
    def name(self):
        return self._name

    @property
    def image_shape(self): # [CHW]
        return list(self._raw_shape[1:])

    @property
    def num_channels(self):
        assert len(self.image_shape) == 3 # CHW
        return self.image_shape[0]

    @property
    def resolution(self):
        assert len(self.image_shape) == 3 # CHW
        if self.image_shape[1] != self.image_shape[2]:
            raise ValueError(f'images are {self.image_shape[2]}x{self.image_shape[1]} (width x height), training needs square images; '
                'make them square with dataset_tool.py --resolution=NxN --transform=center-crop')
        return self.image_shape[1]

    @property
    def label_shape(self):
        if self._label_shape is None:
            raw_labels = self._get_raw_labels()
            if raw_labels.dtype == np.int64:
                self._label_shape = [int(np.max(raw_labels)) + 1]
            else:
                self._label_shape = raw_labels.shape[1:]
        return list(self._label_shape)

    @property
    def label_dim(self):
        assert len(self.label_shape) == 1
        return self.label_shape[0]

    @property
    def interface(self):
        """The network interface this data asks for: img_resolution, img_channels, label_dim."""
        return dict(img_resolution=self.resolution, img_channels=self.num_channels, label_dim=self.label_dim)

    @property
    def class_names(self):
        """Name of each label ([name of label 0, ...]), None when the data names none or labels are off."""
        self._get_raw_labels()
        return self._class_names

    @property
    def has_labels(self):
        return any(x != 0 for x in self.label_shape)

    @property
    def has_onehot_labels(self):
        return self._get_raw_labels().dtype == np.int64

def class_names_error(names, count):
    """Why `names` (dataset.json's "class_names") cannot name labels 0..count-1; None if it can. More names
    than labels are fine: a subset of the images (dataset_tool.py --max-images) keeps the names of all."""
    if not isinstance(names, list) or not all(isinstance(x, str) for x in names) or len(names) < count:
        return f'"class_names" must be a list of at least {count} strings, one per label'
    return None

def class_list(names, limit=10):
    """'0=airplane, 1=automobile, ...': which label is which class (the first `limit`, None = all)."""
    shown = ', '.join(f'{idx}={name}' for idx, name in enumerate(names[:limit]))
    return shown + (f', ... ({len(names)} names in dataset.json)' if limit is not None and len(names) > limit else '')

PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4} # IHDR colour type => channels as decoded (palette: indices)

#----------------------------------------------------------------------------
# Dataset subclass that loads images recursively from the specified directory or zip file.

class ImageFolderDataset(Dataset):
    def __init__(self,
        path,                   # Path to directory or zip.
        resolution      = None, # Ensure specific resolution, None = anything goes.
        use_pyspng      = True, # Use pyspng if available?
        **super_kwargs,         # Additional arguments for the Dataset base class.
    ):
        self._path = os.fspath(path)
        self._use_pyspng = use_pyspng
        self._zipfile = None
        self._zipfile_pid = None

        if os.path.isdir(self._path):
            self._type = 'dir'
            self._all_fnames = {os.path.relpath(os.path.join(root, fname), start=self._path).replace('\\', '/')
                for root, _dirs, files in os.walk(self._path) for fname in files}
        elif os.path.isfile(self._path) and self._file_ext(self._path) == '.zip':
            self._type = 'zip'
            self._all_fnames = set(self._get_zipfile().namelist())
        elif os.path.exists(self._path):
            raise IOError(f'{self._path}: not a directory or a .zip file; make one with dataset_tool.py')
        else:
            raise IOError(f'{self._path}: no such directory or zip file')

        PIL.Image.init()
        self._image_fnames = sorted(fname for fname in self._all_fnames if self._file_ext(fname) in PIL.Image.EXTENSION)
        if len(self._image_fnames) == 0:
            raise IOError(f'{self._path}: no image files found')

        name = os.path.splitext(os.path.basename(self._path.rstrip('/\\')))[0]
        self._check_sizes()
        self._image_shape = list(self._load_raw_image(0).shape)
        raw_shape = [len(self._image_fnames)] + self._image_shape
        if resolution is not None and (raw_shape[2] != resolution or raw_shape[3] != resolution):
            raise IOError(f'{self._path}: images are {raw_shape[3]}x{raw_shape[2]}, expected {resolution}x{resolution}')
        super().__init__(name=name, raw_shape=raw_shape, **super_kwargs)
        if self._use_labels:
            self._get_raw_labels() # fail now, not in a DataLoader worker, when dataset.json is broken

    def check_images(self):
        """Decode every image in use once, as the pools will, so that a damaged one stops train.py before it
        makes a run folder rather than minutes into the run (about 0.1 ms per 32x32 PNG: docs/datasets.md)."""
        damaged = [] # (file name, reason)
        for raw_idx in np.unique(self._raw_idx):
            try:
                self._load_raw_image(raw_idx)
            except DamagedImageError as err:
                damaged.append((self._image_fnames[raw_idx], err.__cause__))
        if damaged:
            raise self._damaged(*damaged[0], others=len(damaged) - 1)

    def _check_sizes(self):
        # One size for all images, checked now from the headers (Image.open reads no pixels) rather
        # than when a DataLoader worker meets the odd one out in the middle of a run.
        sizes = {}
        for fname in self._image_fnames:
            try:
                with self._open_file(fname) as f:
                    sizes[fname] = self._read_size(f)
            except Exception as err:
                raise self._damaged(fname, err) from err
        counts = {}
        for size in sizes.values():
            counts[size] = counts.get(size, 0) + 1
        if len(counts) > 1:
            common = max(counts, key=counts.get)
            odd = next(fname for fname, size in sizes.items() if size != common)
            others = len(sizes) - counts[common]
            raise ValueError(f'{self._path}: image {odd} is {"x".join(map(str, sizes[odd]))}, {counts[common]} other images are '
                f'{"x".join(map(str, common))} ({others} image{"s" if others > 1 else ""} of another size); '
                'make all images the same size with dataset_tool.py --resolution')

    @staticmethod
    def _read_size(f):
        """(width, height, channels) from the header. PNG's IHDR is parsed directly (4x faster than PIL)."""
        head = f.read(26)
        if head[:8] == b'\x89PNG\r\n\x1a\n' and head[12:16] == b'IHDR' and head[25] in PNG_CHANNELS:
            return (*struct.unpack('>II', head[16:24]), PNG_CHANNELS[head[25]])
        with PIL.Image.open(io.BytesIO(head + f.read())) as img:
            return (*img.size, len(img.getbands()))

    @staticmethod
    def _file_ext(fname):
        return os.path.splitext(fname)[1].lower()

    def _get_zipfile(self):
        assert self._type == 'zip'
        # Reopen in a forked worker: a handle shared between processes would interleave seeks.
        if self._zipfile is None or self._zipfile_pid != os.getpid():
            try:
                self._zipfile = zipfile.ZipFile(self._path)
            except zipfile.BadZipFile as err:
                raise IOError(f'{self._path}: not a valid zip file ({err})') from err
            self._zipfile_pid = os.getpid()
        return self._zipfile

    def _open_file(self, fname):
        if self._type == 'dir':
            return open(os.path.join(self._path, fname), 'rb')
        if self._type == 'zip':
            return self._get_zipfile().open(fname, 'r')
        return None

    def close(self):
        try:
            if self._zipfile is not None and self._zipfile_pid == os.getpid():
                self._zipfile.close()
        finally:
            self._zipfile = None

    def __getstate__(self):
        return dict(super().__getstate__(), _zipfile=None, _zipfile_pid=None)

    def _load_raw_image(self, raw_idx):
        fname = self._image_fnames[raw_idx]
        try:
            with self._open_file(fname) as f:
                if self._use_pyspng and pyspng is not None and self._file_ext(fname) == '.png':
                    image = pyspng.load(f.read())
                else:
                    image = np.array(PIL.Image.open(f))
        except Exception as err:
            raise self._damaged(fname, err) from err
        if image.ndim == 2:
            image = image[:, :, np.newaxis] # HW => HWC
        image = image.transpose(2, 0, 1) # HWC => CHW
        if image.dtype != np.uint8:
            raise IOError(f'{self._path}: image {fname} has {image.dtype} pixels, expected 8-bit; convert it with dataset_tool.py')
        if hasattr(self, '_image_shape') and list(image.shape) != self._image_shape:
            c, h, w = image.shape
            ec, eh, ew = self._image_shape
            raise IOError(f'{self._path}: image {fname} is {w}x{h}x{c}, other images are {ew}x{eh}x{ec}; '
                f'make all images the same size with dataset_tool.py --resolution')
        return image

    def _damaged(self, fname, err, others=0):
        reason = ' '.join(str(err).split()) or type(err).__name__
        more = f' and {others} other image{"s" if others > 1 else ""}' if others else ''
        return DamagedImageError(f'{self._path}: cannot decode image {fname} ({reason}){more}; remove or re-save '
            f'{"them" if others else "it"}, or list every damaged image and make a clean copy with: python dataset_tool.py '
            f'--source={shlex.quote(self._path)} --dest=DEST.zip (it writes DEST.zip only if none is damaged)')

    def _load_raw_labels(self):
        fname = 'dataset.json'
        if fname not in self._all_fnames:
            return None
        try:
            with self._open_file(fname) as f:
                meta = json.load(f)
            labels, class_names = meta['labels'], meta.get('class_names')
        except Exception as err:
            raise IOError(f'{self._path}: cannot read labels from {fname} ({err})') from err
        if labels is None:
            return None
        labels = self._parse_labels(labels, fname)
        count = int(labels.max()) + 1 if labels.dtype == np.int64 else labels.shape[1]
        if class_names is not None and (error := class_names_error(class_names, count)):
            raise IOError(f'{self._path}: {fname} {error}; fix or remove it')
        self._class_names = class_names
        return labels

    def _parse_labels(self, labels, fname):
        labels = dict(labels)
        missing = [name for name in self._image_fnames if name not in labels]
        if missing:
            raise IOError(f'{self._path}: {fname} has no label for {missing[0]} ({len(missing)} images without labels)')
        labels = np.array([labels[name] for name in self._image_fnames])
        if labels.ndim == 1:
            if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
                raise IOError(f'{self._path}: {fname} labels must be non-negative integers or equal-length lists of numbers')
            return labels.astype(np.int64)
        if labels.ndim == 2 and np.issubdtype(labels.dtype, np.number):
            return labels.astype(np.float32)
        raise IOError(f'{self._path}: {fname} labels must be non-negative integers or equal-length lists of numbers')

#----------------------------------------------------------------------------
