"""What people watch while a run trains, beside the status line and stats.jsonl: TensorBoard event
files, a progress bar within each tick, and an optional sample-quality metric.

TensorBoard (when the `tensorboard` package is installed): rank 0 writes event files into the run
directory: the mean of every statistic of stats.jsonl, under the same name, and each snapshot's
sample grid. The step axis is images seen, so a resumed run continues the curves in the same
folder; events the interrupted run wrote past the resumed state are hidden (purge_step), so no
curve doubles back.

Progress bar: rank 0 shows the kimg done within the current tick, on the terminal only: nothing
when stdout is not a terminal, and nothing in log.txt. It counts images from Python ints: no GPU sync.

Metric (SampleFD): the Frechet distance between N EMA samples (seeds 0..N-1, edm_sampler, as the
sample grid) and N training images (features computed once per run), in the features of metrics.fid's
detector: the built-in stand-in by default (reported as Metrics/fd_standin: NOT comparable to
published FID), or Inception (Metrics/fd_inception: from N samples, biased upwards, so not FID-50k
either). Every rank samples and embeds its share of the seeds and of the training images; the
feature sums are added up across ranks (as fid.py does), so the cost is divided by the GPU count.
It uses its own random generators: the training's random streams, and so exact resume, are untouched.
"""

import sys

import numpy as np
import PIL.Image
import torch
import tqdm

import dnnlib
from metrics import fid
from torch_utils import distributed as dist
from torch_utils import training_stats
from sampling import edm
from sampling.generate import generate_images, seed_drawer

#----------------------------------------------------------------------------

def _terminal():
    """The stream the progress bar may write to, or None when stdout is not a terminal."""
    stream = sys.stdout
    if isinstance(stream, dnnlib.util.Logger): # it copies into log.txt: the bar goes to the terminal only
        stream = stream.stdout
    return stream if getattr(stream, 'isatty', lambda: False)() else None

def _summary_writer(run_dir, start_nimg):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print('TensorBoard logs: off (pip install tensorboard to get them)')
        return None
    print(f'TensorBoard logs: tensorboard --logdir={run_dir}')
    # A resumed run goes on from the state at start_nimg: later events of the interrupted run are hidden.
    return SummaryWriter(run_dir, purge_step=(start_nimg + 1 if start_nimg else None))

#----------------------------------------------------------------------------

class SampleFD:
    """fd = SampleFD(dataset_obj, num_images)(net): FD of the net's samples against training images;
    a float on rank 0, None on the other ranks. All ranks must construct and call it together.
    detector: 'standin', 'inception' (downloaded once, then cached), or a detector pickle's path or URL."""

    def __init__(self, dataset_obj, num_images, detector=fid.STANDIN, num_steps=18, batch=64, device=torch.device('cpu')):
        try:
            standard = None if detector == 'inception' else detector # None: the standard Inception detector
            det = fid.rank0_first(lambda: fid.open_detector(standard, verbose=(dist.get_rank() == 0)))
        except fid.FIDError as err:
            raise fid.FIDError(f'the FD metric\'s detector ({detector}): {err}') from None
        self.detector = fid.build_detector(det, device)
        self.name = 'Metrics/fd_' + ('standin' if det.data is None else 'inception' if det.standard else 'detector')
        self.num_images, self.num_steps, self.batch, self.device = num_images, num_steps, batch, device
        self.feature_dim = fid.detector_features(self.detector, torch.as_tensor(dataset_obj[0][0][np.newaxis]), device).shape[1]
        # A fixed draw of training images, the same on every rank; each rank embeds every world_size-th.
        idx = np.random.RandomState(0).permutation(len(dataset_obj))[:num_images][dist.get_rank()::dist.get_world_size()]
        batches = (torch.as_tensor(np.stack([dataset_obj[i][0] for i in idx[k : k + batch]])) for k in range(0, len(idx), batch))
        self.real = self._stats(batches)
        what = f'stand-in detector {det.id}; {fid.NOT_COMPARABLE}' if det.data is None else f'{det.url}; not FID-50k'
        dist.print0(f'Metric {self.name}: FD of {num_images} EMA samples (seeds 0-{num_images - 1}, {num_steps} steps) '
                    f'against {min(num_images, len(dataset_obj))} training images ({what})')

    def _stats(self, batches):
        """mu, sigma over all ranks of the uint8 NCHW image batches each rank gives."""
        num = torch.zeros([], dtype=torch.float64, device=self.device)
        total = torch.zeros([self.feature_dim], dtype=torch.float64, device=self.device)
        outer = torch.zeros([self.feature_dim, self.feature_dim], dtype=torch.float64, device=self.device)
        for images in batches:
            features = fid.detector_features(self.detector, images, self.device).to(torch.float64)
            num += features.shape[0]
            total += features.sum(0)
            outer += features.T @ features
        if dist.get_world_size() > 1:
            for t in [num, total, outer]:
                torch.distributed.all_reduce(t)
        return fid.stats_from_sums(num, total, outer)

    def fd(self, batches):
        """FD of the images in batches (this rank's share) against the training images; rank 0 only."""
        mu, sigma = self._stats(batches)
        return fid.calculate_fid_from_inception_stats(mu, sigma, *self.real) if dist.get_rank() == 0 else None

    def _samples(self, net):
        seeds = list(range(self.num_images))[dist.get_rank()::dist.get_world_size()]
        batches = [seeds[k : k + self.batch] for k in range(0, len(seeds), self.batch)]
        for _, images, _ in generate_images(net, edm.edm_sampler, dict(num_steps=self.num_steps), batches, seed_drawer(net, self.device)):
            yield torch.as_tensor(images).permute(0, 3, 1, 2) # rounded as the saved images are

    @torch.no_grad()
    def __call__(self, net):
        return self.fd(self._samples(net))

#----------------------------------------------------------------------------

class Monitor:
    """The training loop's hooks: step() after each step, tick() at each tick's end (before the
    statistics are collected), log_stats() with what goes to stats.jsonl, log_grid() with each saved
    sample grid, close() at the end. metric_every=0: no metric. start_nimg: where this run (re)starts."""

    def __init__(self, run_dir, start_nimg, kimg_per_tick, dataset_obj=None, metric_every=0, metric_images=1000,
                 metric_detector=fid.STANDIN, num_steps=18, batch=64, device=torch.device('cpu')):
        self.kimg_per_tick, self.metric_every = kimg_per_tick, metric_every
        self.bar, self.metric_fresh = None, False
        self.metric = None
        if metric_every: # first: a detector that cannot be had stops the run before any file is written
            self.metric = SampleFD(dataset_obj, metric_images, metric_detector, num_steps, batch, device)
        self.writer = _summary_writer(run_dir, start_nimg) if dist.get_rank() == 0 else None
        self.terminal = _terminal() if dist.get_rank() == 0 else None

    def step(self, cur_nimg, tick_start_nimg):
        if self.terminal is None:
            return
        if self.bar is None:
            self.bar = tqdm.tqdm(total=self.kimg_per_tick, file=self.terminal, leave=False, dynamic_ncols=True,
                                 bar_format='tick {n:.1f}/{total:g} kimg |{bar}| {elapsed}<{remaining}')
        self.bar.update((cur_nimg - tick_start_nimg) / 1e3 - self.bar.n)

    def tick(self, net, cur_tick, done):
        """Closes the bar and, when due, reports the metric of net (all ranks together).
        Returns the metric's field for the status line, '' if none this tick."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self.metric_fresh = self.metric is not None and (done or cur_tick % self.metric_every == 0)
        if not self.metric_fresh:
            return ''
        value = training_stats.report0(self.metric.name, self.metric(net))
        return f'{self.metric.name.split("/")[-1]} {value:<8.4g}' if dist.get_rank() == 0 else ''

    def log_stats(self, stats, cur_nimg):
        """The means of training_stats.default_collector.as_dict(); the metric only when computed this tick."""
        if self.writer is None:
            return
        for name, value in stats.items():
            if np.isfinite(value['mean']) and (self.metric_fresh or self.metric is None or name != self.metric.name):
                self.writer.add_scalar(name, value['mean'], cur_nimg)
        self.writer.flush()

    def log_grid(self, path, cur_nimg):
        """The sample grid PNG just saved, as the image 'Samples'."""
        if self.writer is not None:
            grid = np.array(PIL.Image.open(path))
            self.writer.add_image('Samples', grid, cur_nimg, dataformats=('HW' if grid.ndim == 2 else 'HWC'))
            self.writer.flush()

    def close(self):
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()

#----------------------------------------------------------------------------
