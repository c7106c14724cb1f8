"""FID feature extraction speed: fid.py's pipeline (metrics/fid.py) against the detector alone, at the same batch.

  detector   the detector's forward on uint8 batches already in memory (the floor)
  pipeline   fid.calculate_inception_stats on a folder of PNGs: reading, decoding, batching,
             the detector and the statistics sums (what `fid.py calc` and `fid.py ref` run)
On CPU the times are the process's CPU time (PNG decoding in DataLoader workers is not counted:
use --workers=0 to include it), which other programs on a shared machine do not inflate.

The standard Inception-v3 cannot be downloaded on the development machines, so by default this uses
the built-in stand-in detector (fid.py --detector=standin: fixed random convolutions and pooling,
far cheaper than Inception): the ratio then shows the pipeline's overhead at its most visible. Pass --detector to
measure a real detector pickle.

    python bench/fid_speed.py --num=2000 --batch=64
    python bench/fid_speed.py --detector=inception-2015-12-05.pkl --res=32
"""

import os
import pickle
import statistics
import tempfile
import time

import click
import numpy as np
import torch

from bench import report
from metrics import fid
from torch_utils import distributed as dist
from sampling.images import save_png

@click.command()
@click.option('--detector', help='Detector pickle  [default: the built-in stand-in]', metavar='PATH', type=str)
@click.option('--num',      help='Images', metavar='INT', type=click.IntRange(min=2), default=2000, show_default=True)
@click.option('--res',      help='Image resolution', metavar='INT', type=click.IntRange(min=4), default=32, show_default=True)
@click.option('--batch',    help='Images per batch', metavar='INT', type=click.IntRange(min=1), default=64, show_default=True)
@click.option('--workers',  help='DataLoader workers of the pipeline', metavar='INT', type=click.IntRange(min=0), default=0, show_default=True)
@click.option('--rounds',   help='Timing rounds (medians reported)', metavar='INT', type=click.IntRange(min=1), default=3, show_default=True)
@click.option('--threads',  help='Torch threads  [default: torch default]', metavar='INT', type=click.IntRange(min=1))
@click.option('--doc/--no-doc', help='Rewrite the section in docs/benchmarks.md', default=True, show_default=True)
def main(detector, num, res, batch, workers, rounds, threads, doc):
    """Time FID feature extraction against the detector alone."""
    if threads is not None:
        torch.set_num_threads(threads)
    env = report.machine()
    dist.init()
    device = dist.device()
    clock, clock_name = (time.perf_counter, 'wall') if device.type == 'cuda' else (time.process_time, 'CPU')
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    with tempfile.TemporaryDirectory() as tmp:
        desc = detector or 'built-in stand-in detector (NOT Inception)'
        if detector is None:
            net = fid.StandInDetector().to(device)
        else:
            with open(detector, 'rb') as f:
                net = pickle.load(f).to(device)
        images = np.random.RandomState(0).randint(0, 256, size=[num, res, res, 3], dtype=np.uint8)
        folder = os.path.join(tmp, 'images')
        os.makedirs(folder)
        for i, image in enumerate(images):
            save_png(image, os.path.join(folder, f'{i:06d}.png'))
        batches = torch.as_tensor(images).permute(0, 3, 1, 2).split(batch)

        def floor():
            with torch.no_grad():
                for b in batches:
                    net(b.to(device), return_features=True)
        def pipeline():
            fid.calculate_inception_stats(folder, max_batch_size=batch, num_workers=workers, device=device, detector_net=net)

        print(env)
        times = dict(floor=[], pipeline=[])
        for r in range(rounds + 1):
            for name, fn in (('floor', floor), ('pipeline', pipeline)):
                sync(); start = clock(); fn(); sync()
                if r > 0: # round 0 warms up
                    times[name].append(clock() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    lines = ['## FID feature extraction speed (`bench/fid_speed.py`)', '',
             f'{desc}; {num} random {res}x{res} RGB PNGs, batch {batch}, {workers} DataLoader workers; '
             f'medians of {rounds} interleaved rounds of {clock_name} time.', '',
             f'| what | {clock_name} s | images/{clock_name} s | detector / this |', '|---|---:|---:|---:|',
             f'| detector alone (uint8 batches in memory) | {med["floor"]:.3f} | {num / med["floor"]:.0f} | 1.000 |',
             f'| fid.calculate_inception_stats (PNG folder) | {med["pipeline"]:.3f} | {num / med["pipeline"]:.0f} | {med["floor"] / med["pipeline"]:.3f} |',
             '', f'Pipeline overhead beyond the detector: {(med["pipeline"] - med["floor"]) / num * 1e3:.3f} ms {clock_name} per image '
             '(reading, decoding, batching, statistics); it does not depend on the detector, so with a detector that costs '
             'more per image than this, the ratio moves towards 1.']
    print('\n'.join(lines))
    if doc:
        report.update_section('fid_speed' if detector is None else 'fid_speed_detector', '\n'.join(lines), env)

if __name__ == '__main__':
    main()
