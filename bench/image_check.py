"""What checking every image of a zip dataset costs (docs/datasets.md, "Damaged images"): per image,
reading its bytes, its header (ImageFolderDataset._read_size, the size check done whenever a dataset
is opened), PIL's verify() (chunk checksums, no decompression) and the full decode that
ImageFolderDataset.check_images() does before train.py makes a run folder.

    python bench/image_check.py --data=datasets/uci-digits-16x16.zip
    python bench/image_check.py --data=/tmp/rand50k-32x32.zip --make=50000 --resolution=32
"""

import io
import time
import zipfile

import click
import numpy as np
import PIL.Image

from bench import report
from training.dataset import ImageFolderDataset

def make_zip(path, num, resolution):
    """num random RGB PNGs, stored as dataset_tool.py stores them (compress_level=0, ZIP_STORED)."""
    rnd = np.random.RandomState(0)
    with zipfile.ZipFile(path, 'x', zipfile.ZIP_STORED) as z:
        for idx in range(num):
            png = io.BytesIO()
            PIL.Image.fromarray(rnd.randint(0, 256, [resolution, resolution, 3], dtype=np.uint8)).save(png, format='png', compress_level=0)
            z.writestr(f'{idx // 1000:05d}/img{idx:08d}.png', png.getvalue())

@click.command()
@click.option('--data',       help='Zip dataset to time', metavar='ZIP', type=str, required=True)
@click.option('--make',       help='First write this many random PNGs to --data (which must not exist)', metavar='INT', type=click.IntRange(min=1))
@click.option('--resolution', help='Side of the images --make writes', metavar='INT', type=click.IntRange(min=1), default=32, show_default=True)
def main(data, make, resolution):
    if make:
        make_zip(data, make, resolution)
    env = report.machine()
    ds = ImageFolderDataset(data)
    z = zipfile.ZipFile(data)
    ways = [('bytes', lambda f: f.read()), ('header', ImageFolderDataset._read_size),
            ('verify', lambda f: PIL.Image.open(f).verify()), ('decode', lambda f: np.array(PIL.Image.open(f)))]
    for what, read in ways:
        start = time.perf_counter()
        for fname in ds._image_fnames:
            with z.open(fname) as f:
                read(f)
        sec = time.perf_counter() - start
        print(f'{data}: {len(ds)} images {"x".join(map(str, ds.image_shape))}, {what}: {sec:.2f} s ({sec / len(ds) * 1e6:.0f} us/image)')
    start = time.perf_counter()
    ds.check_images()
    print(f'{data}: check_images(): {time.perf_counter() - start:.2f} s; {env}')

if __name__ == '__main__':
    main()
