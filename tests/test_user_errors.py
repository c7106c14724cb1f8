"""Mistakes a new user makes with the data, reported by train.py as one line: non-square images and
images of two sizes (before anything is written; they used to fail in a DataLoader worker after the
run directory existed), and a damaged image, which only decoding finds (in a DataLoader worker)."""

import os
import subprocess
import sys

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

@pytest.mark.slow
def test_train_reports_a_damaged_image_in_one_line(tmp_path):
    # The header is intact, so the size check passes and the damage shows when a worker decodes the image.
    data = write_folder(tmp_path / 'data', [(8, 8)] * 8)
    damaged = os.path.join(data, 'img5.png')
    with open(damaged, 'rb') as f:
        png = f.read()
    with open(damaged, 'wb') as f:
        f.write(png[:len(png) // 2])
    proc = subprocess.run([sys.executable, 'train.py', f'--outdir={tmp_path / "runs"}', f'--data={data}', *TINY],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    output = proc.stdout + proc.stderr # once training runs, its log takes stderr too
    assert proc.returncode != 0
    assert 'Traceback' not in output, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith('Error: ')]
    assert len(errors) == 1 and f'{data}: cannot decode image img5.png' in errors[0] and 'dataset_tool.py --source=' in errors[0], output[-2000:]
