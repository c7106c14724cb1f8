"""Mistakes a new user makes with the data, reported by train.py as one line: non-square images and
images of two sizes (before anything is written; they used to fail in a DataLoader worker after the
run directory existed), and a damaged image, which only decoding finds (train.py decodes every image
before it makes the run folder)."""

import os
import subprocess
import sys
import zipfile

import numpy as np
import PIL.Image
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--cbase=8', '--cres=1,1', '--batch=4', '--aot=0', '--tick=0.004', '--duration=0.008', '--workers=1']

def write_folder(path, sizes):
    """RGB PNGs img0.png, ... of the given (width, height)."""
    os.makedirs(path)
    rnd = np.random.RandomState(0)
    for i, (w, h) in enumerate(sizes):
        PIL.Image.fromarray(rnd.randint(0, 256, [h, w, 3], dtype=np.uint8)).save(os.path.join(path, f'img{i}.png'))
    return str(path)

NON_SQUARE = ([(40, 30)] * 8, 'images are 40x30 (width x height), training needs square images')
TWO_SIZES = ([(8, 8)] * 7 + [(16, 16)], 'image img7.png is 16x16x3, 7 other images are 8x8x3')

@pytest.mark.slow
@pytest.mark.parametrize('sizes, message, dry_run', [(*NON_SQUARE, True), (*TWO_SIZES, True), (*TWO_SIZES, False)])
def test_train_refuses_bad_image_sizes(tmp_path, sizes, message, dry_run):
    data = write_folder(tmp_path / 'data', sizes)
    outdir = tmp_path / 'runs'
    proc = subprocess.run([sys.executable, 'train.py', f'--outdir={outdir}', f'--data={data}', *TINY, *(['--dry-run'] if dry_run else [])],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('Error: ') and message in lines[0], proc.stderr[-2000:]
    assert not outdir.exists() or not any(outdir.iterdir()) # no run directory left behind

@pytest.mark.parametrize('as_zip', [False, True])
def test_train_refuses_a_damaged_image_before_the_run_folder(tmp_path, as_zip):
    # The header is intact, so the size check passes; only decoding finds the damage.
    data = write_folder(tmp_path / 'data', [(8, 8)] * 8)
    damaged = os.path.join(data, 'img5.png')
    with open(damaged, 'rb') as f:
        png = f.read()
    with open(damaged, 'wb') as f:
        f.write(png[:len(png) // 2])
    if as_zip:
        with zipfile.ZipFile(tmp_path / 'data.zip', 'w') as z:
            for name in sorted(os.listdir(data)):
                z.write(os.path.join(data, name), name)
        data = str(tmp_path / 'data.zip')
    outdir = tmp_path / 'runs'
    proc = subprocess.run([sys.executable, 'train.py', f'--outdir={outdir}', f'--data={data}', *TINY],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('Error: ') and f'{data}: cannot decode image img5.png (' in lines[0], proc.stderr[-2000:]
    assert 'remove or re-save it' in lines[0] and f'dataset_tool.py --source={data} ' in lines[0], lines[0]
    assert not outdir.exists() # found before the run folder is made
