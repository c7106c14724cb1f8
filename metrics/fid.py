"""Frechet Inception Distance (FID), compatible with EDM's fid.py, plus improved precision and recall:
the library that fid.py (the command line) and the training monitor both call.

Reference statistics are EDM's .npz files (mu, sigma). Features come from StyleGAN3's Inception-v3
detector, the one EDM uses, so the numbers are comparable with published ones. Any other detector
gives numbers that are labelled NOT comparable wherever they appear; STANDIN names a small built-in
random-feature network for quick checks on machines that cannot download Inception.

Failures a user can fix (missing or unreadable images, a detector that cannot be had, a file that is
not a statistics file) raise FIDError with a one-line message; the programs add the flag to change."""

import os
import re
import json
import pickle
import hashlib
import tqdm
import numpy as np
import scipy.linalg
import torch
import dnnlib
from torch_utils import distributed as dist
from training import dataset

#----------------------------------------------------------------------------
# The standard detector: a PyTorch translation of
# http://download.tensorflow.org/models/image/imagenet/inception-2015-12-05.tgz, published with StyleGAN3.
# No public source states its sha256, so it is not verified; stats record the sha256 actually used.

DETECTOR_URL = 'https://api.ngc.nvidia.com/v2/models/nvidia/research/stylegan3/versions/1/files/metrics/inception-2015-12-05.pkl'
DETECTOR_NAME = 'inception-2015-12-05' # id of the standard detector; EDM's ref files carry no id and mean this one
NOT_COMPARABLE = 'NOT comparable to published FID'
STANDIN = 'standin' # detector name of the built-in stand-in
DOWNLOAD_ATTEMPTS = 3 # the files live on NVIDIA's CDNs; fail in seconds on machines without access

class FIDError(Exception):
    """A failure the user can fix; the message is one line."""

class TooFewImages(FIDError):
    """Fewer images than asked for (path, found, needed)."""
    def __init__(self, path, found, needed):
        super().__init__(f'{path}: found {found} images, need {needed}')
        self.path, self.found, self.needed = path, found, needed

def _one_line(err):
    # Data loader workers' exceptions arrive with the worker's traceback in the message: keep its last line.
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    if not lines:
        return repr(err)
    if 'Traceback' in str(err):
        return re.sub(r'^[A-Za-z_.]*(Error|Exception): ', '', lines[-1])
    return ' '.join(lines)

def _open_url(url, **kwargs):
    try:
        return dnnlib.util.open_url(url, num_attempts=DOWNLOAD_ATTEMPTS, **kwargs)
    except IOError as err:
        raise FIDError(_one_line(err)) from None

def rank0_first(fn):
    # Rank 0 downloads into the cache first; the other ranks then read the cached copy.
    if dist.get_rank() != 0:
        dist.barrier()
    result = fn()
    if dist.get_rank() == 0:
        dist.barrier()
    return result

#----------------------------------------------------------------------------
# Built-in stand-in detector (STANDIN): fixed random convolutions, 128-d features. It
# needs no download and measures roughly the same thing (distance between feature distributions),
# but its numbers mean nothing outside this code: stats carry its id and every line says so.

class StandInDetector(torch.nn.Module):
    def __init__(self, seed=0, size=32):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.size = size
        self.register_buffer('weight1', torch.randn([32, 3, 3, 3], generator=gen) / 27 ** 0.5)
        self.register_buffer('weight2', torch.randn([64, 32, 3, 3], generator=gen) / 288 ** 0.5)

    def forward(self, images, return_features=False):
        # uint8 NCHW of any size, resized to one size so that resolutions compare; mean and std of the maps.
        x = images.to(torch.float32) / 127.5 - 1
        x = torch.nn.functional.interpolate(x, size=[self.size, self.size], mode='bilinear', antialias=True, align_corners=False)
        x = torch.nn.functional.conv2d(x, self.weight1, padding=1).relu()
        x = torch.nn.functional.conv2d(torch.nn.functional.avg_pool2d(x, 2), self.weight2, padding=1).relu()
        return torch.cat([x.mean(dim=[2, 3]), x.std(dim=[2, 3])], dim=1)

def _standin_info():
    weights = b''.join(t.numpy().tobytes() for t in StandInDetector().buffers())
    sha256 = hashlib.sha256(weights).hexdigest() # names the weights, should torch ever draw other ones
    return dnnlib.EasyDict(url=STANDIN, data=None, sha256=sha256, standard=False, id=f'{STANDIN}-{sha256[:16]}')

#----------------------------------------------------------------------------
# Detector: a pickle in StyleGAN3's format (a persistent class that carries its source; unpickling
# runs that code), called as net(images_uint8_NCHW, return_features=True) -> [N, D] features.

def open_detector(detector=None, verbose=True):
    if detector == STANDIN:
        return _standin_info()
    """The detector's file and identity (url, data, sha256, standard, id); None: the standard Inception,
    STANDIN: the built-in stand-in (data None), else a path or URL of a detector pickle."""
    url = DETECTOR_URL if detector is None else detector
    with _open_url(url, verbose=verbose) as f:
        data = f.read()
    sha256 = hashlib.sha256(data).hexdigest()
    standard = (url == DETECTOR_URL)
    return dnnlib.EasyDict(url=url, data=data, sha256=sha256, standard=standard,
        id=(DETECTOR_NAME if standard else f'sha256:{sha256}'))

def build_detector(det, device):
    if det.data is None:
        dist.print0(f'Using the built-in stand-in detector {det.id} ({NOT_COMPARABLE})')
        return StandInDetector().to(device)
    dist.print0(f'Loading detector {det.url} (unpickling runs code stored in the file)...')
    try:
        net = pickle.loads(det.data)
    except Exception as err:
        raise FIDError(f'{det.url}: not a detector pickle ({_one_line(err)})') from None
    return net.to(device) # as EDM: the pickle's own mode; features are computed under no_grad

def not_standard(det):
    what = f'stand-in detector {det.id}' if det.data is None else f'detector {det.url}'
    return f'{NOT_COMPARABLE}: {what} is not the standard {DETECTOR_NAME}'

def detector_note(det, ref=None, gen=None):
    """What a number of a non-standard detector means; for an FID, next to the FD that two random halves
    of the reference set (of the images, for reference files without it) score between themselves."""
    if det.standard:
        return ''
    comparison = ''
    for stats, what in [(ref, "the reference set's"), (gen, "these images'")]:
        if stats is not None and not np.isnan(stats.get('halves_fd', np.nan)):
            comparison = f'; for comparison, {what} two random halves score {float(stats["halves_fd"]):g}'
            break
    return f'  ({not_standard(det)}{comparison})'

def comparison_fields(det, result):
    """halves_fd for the statistics file of a non-standard detector (result: mu, sigma, features)."""
    if det.standard:
        return {}
    value = halves_fd(result[2].cpu().numpy())
    return dict(halves_fd=np.nan if value is None else value)

#----------------------------------------------------------------------------
# Inception statistics of an image folder or zip. Images are split into batches as in EDM; each
# rank runs its share, and the sums (and, if asked, the features in dataset order) are gathered.

@torch.no_grad()
def detector_features(net, images, device):
    """[N, D] features of uint8 NCHW images (gray repeated to RGB)."""
    if images.shape[1] not in [1, 3]:
        raise FIDError(f'images have {images.shape[1]} channels, the detector takes RGB or grayscale; convert them with dataset_tool.py')
    if images.shape[1] == 1:
        images = images.repeat([1, 3, 1, 1])
    features = net(images.to(device), return_features=True)
    if not isinstance(features, torch.Tensor) or features.ndim != 2 or features.shape[0] != images.shape[0]:
        raise FIDError(f'detector returned {getattr(features, "shape", type(features))}, expected [N, D] features for return_features=True')
    return features

def stats_from_sums(num, total, total_outer):
    # EDM's formula, in float64: sigma = (sum f f^T - n mu mu^T) / (n - 1), the unbiased covariance (np.cov).
    mu = total / num
    sigma = (total_outer - torch.outer(mu, mu) * num) / (num - 1)
    return mu.cpu().numpy(), sigma.cpu().numpy()

def default_workers():
    # EDM's 3, or as many as this process may run on: more only compete for the cores (and torch warns).
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError: # not on Linux
        cores = os.cpu_count() or 1
    return min(3, cores)

def open_images(image_path, num_expected=None, seed=0):
    """The image folder or zip as a dataset, or a one-line error (missing, unreadable, mixed sizes, too few)."""
    dist.print0(f'Loading images from "{image_path}"...')
    try:
        dataset_obj = dataset.ImageFolderDataset(path=image_path, max_size=num_expected, random_seed=seed)
    except (IOError, ValueError) as err:
        raise FIDError(_one_line(err)) from None
    if num_expected is not None and len(dataset_obj) < num_expected:
        raise TooFewImages(image_path, len(dataset_obj), num_expected)
    if len(dataset_obj) < 2:
        raise FIDError(f'{image_path}: found {len(dataset_obj)} images, need at least 2 to compute statistics')
    return dataset_obj

def calculate_inception_stats(image_path, num_expected=None, seed=0, max_batch_size=64, num_workers=None,
        prefetch_factor=2, device=None, detector_net=None, return_features=False, dataset_obj=None):
    """Returns mu, sigma (float64 numpy) and, with return_features, all features on rank 0 ([N, D] float32, dataset order).
    dataset_obj: open_images(image_path, num_expected, seed) when the caller has it already."""
    device = dist.device() if device is None else device
    num_workers = default_workers() if num_workers is None else num_workers
    if dataset_obj is None:
        dataset_obj = open_images(image_path, num_expected, seed)
    if detector_net is None:
        det = rank0_first(lambda: open_detector(verbose=(dist.get_rank() == 0)))
        detector_net = build_detector(det, device)

    # Same split as EDM: a multiple of world_size batches, dealt out round-robin.
    num_images, world, rank = len(dataset_obj), dist.get_world_size(), dist.get_rank()
    num_batches = ((num_images - 1) // (max_batch_size * world) + 1) * world
    all_batches = [b.tolist() for b in torch.arange(num_images).tensor_split(num_batches)]
    rank_batches = [b for b in all_batches[rank :: world] if len(b) > 0]
    data_loader = torch.utils.data.DataLoader(dataset_obj, batch_sampler=rank_batches, num_workers=num_workers,
        prefetch_factor=(prefetch_factor if num_workers > 0 else None))

    # The first image tells the feature dimension (a rank may get only empty batches).
    feature_dim = detector_features(detector_net, torch.as_tensor(dataset_obj[0][0][np.newaxis]), device).shape[1]
    total = torch.zeros([feature_dim], dtype=torch.float64, device=device)
    total_outer = torch.zeros([feature_dim, feature_dim], dtype=torch.float64, device=device)
    kept = []
    dist.print0(f'Calculating statistics for {num_images} images...')
    try:
        for images, _labels in tqdm.tqdm(data_loader, unit='batch', disable=(rank != 0)):
            features = detector_features(detector_net, images, device)
            f64 = features.to(torch.float64)
            total += f64.sum(0)
            total_outer += f64.T @ f64
            if return_features:
                kept.append(features.to(torch.float32))
    except IOError as err: # e.g. an image of another size, reported by the dataset (maybe from a worker)
        raise FIDError(_one_line(err)) from None

    if world > 1:
        torch.distributed.all_reduce(total)
        torch.distributed.all_reduce(total_outer)
    mu, sigma = stats_from_sums(num_images, total, total_outer)
    if not return_features:
        return mu, sigma

    # Gather features; every rank knows every rank's batches, so rows go back to dataset order.
    local = torch.cat(kept) if kept else torch.zeros([0, feature_dim], device=device)
    if world == 1:
        return mu, sigma, local
    counts = [sum(len(b) for b in all_batches[r :: world]) for r in range(world)]
    padded = torch.zeros([max(counts), feature_dim], device=device)
    padded[:local.shape[0]] = local
    gathered = [torch.empty_like(padded) for _ in range(world)]
    torch.distributed.all_gather(gathered, padded)
    features = None
    if rank == 0:
        features = torch.empty([num_images, feature_dim], device=device)
        for r in range(world):
            idx = [i for b in all_batches[r :: world] for i in b]
            features[idx] = gathered[r][:counts[r]]
    return mu, sigma, features

#----------------------------------------------------------------------------
# Frechet distance between two Gaussians, as EDM. sqrtm of a (near-)singular product may come
# back complex with tiny imaginary parts; the real part is the answer.

def calculate_fid_from_inception_stats(mu, sigma, mu_ref, sigma_ref):
    m = np.square(mu - mu_ref).sum()
    s = scipy.linalg.sqrtm(np.dot(sigma, sigma_ref))
    fid = m + np.trace(sigma + sigma_ref - s * 2)
    return float(np.real(fid))

def halves_fd(features, seed=0):
    """FD between two random halves of one set of features: what two samples of the same images
    score. Numbers of a detector without published values need it as a point of comparison (None
    below 4 images: each half needs 2 for a covariance)."""
    if len(features) < 4:
        return None
    f = np.asarray(features, dtype=np.float64)
    order = np.random.RandomState(seed).permutation(len(f))
    a, b = f[order[:len(f) // 2]], f[order[len(f) // 2:]]
    return calculate_fid_from_inception_stats(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))

#----------------------------------------------------------------------------
# Kernel Inception Distance (Binkowski et al. 2018): the unbiased estimator of the squared MMD with
# the polynomial kernel k(x, y) = (x.y / d + 1)^3, averaged over random subsets as torch-fidelity
# and clean-fid do (100 subsets of 1000; fewer when a set is smaller, as clean-fid). Unlike FID it
# is unbiased, so it can be compared across sample sizes; a mean near 0 (even below) means the sets
# are indistinguishable at this size.

KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
KID_REF_FEATURES = 10000 # "fid.py ref --kid" keeps a random subset of this many reference features

def _mmd2_unbiased(x, y):
    d, m = x.shape[1], x.shape[0]
    k_xx = (x @ x.T / d + 1) ** 3
    k_yy = (y @ y.T / d + 1) ** 3
    k_xy = (x @ y.T / d + 1) ** 3
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1)) # i != j only
    return within - 2 * k_xy.sum() / (m * m)

def calculate_kid(features, features_ref, num_subsets=KID_SUBSETS, max_subset_size=KID_SUBSET_SIZE, seed=0):
    """(mean, std) of the unbiased KID over num_subsets random subsets of min(max_subset_size, n, n_ref)
    rows of each set, drawn without replacement with numpy RandomState(seed) in torch-fidelity's order."""
    x_all = np.asarray(features, dtype=np.float64)
    y_all = np.asarray(features_ref, dtype=np.float64)
    if x_all.ndim != 2 or y_all.ndim != 2 or x_all.shape[1] != y_all.shape[1]:
        raise FIDError(f'KID needs two sets of features of one dimension, got {list(x_all.shape)} and {list(y_all.shape)}')
    m = min(len(x_all), len(y_all), max_subset_size)
    if m < 2:
        raise FIDError(f'KID needs at least 2 features in each set, got {len(x_all)} and {len(y_all)}')
    rng = np.random.RandomState(seed)
    values = np.empty([num_subsets])
    for i in range(num_subsets):
        x = x_all[rng.choice(len(x_all), m, replace=False)]
        y = y_all[rng.choice(len(y_all), m, replace=False)]
        values[i] = _mmd2_unbiased(x, y)
    return float(values.mean()), float(values.std())

def kid_subset(features, num=KID_REF_FEATURES, seed=0):
    """At most num rows of features, a random subset (in their order) when there are more."""
    features = np.asarray(features, dtype=np.float32)
    if len(features) <= num:
        return features
    return features[np.sort(np.random.RandomState(seed).choice(len(features), num, replace=False))]

#----------------------------------------------------------------------------
# Improved precision and recall (Kynkaanniemi et al. 2019): each sample's k-NN ball in its own set
# (k-th nearest other sample) approximates that set's manifold. Precision = fraction of generated
# samples inside some real ball; recall = fraction of real samples inside some generated ball.
# Distances are computed in row blocks of at most max_block entries, so 50k x 50k fits in memory.

def _row_blocks(num_rows, num_cols, max_block):
    rows = max(1, max_block // max(num_cols, 1))
    return [slice(i, min(i + rows, num_rows)) for i in range(0, num_rows, rows)]

def _knn_radii(x, k, max_block, bar):
    radii = torch.empty([x.shape[0]], dtype=x.dtype, device=x.device)
    for rows in _row_blocks(x.shape[0], x.shape[0], max_block):
        radii[rows] = torch.cdist(x[rows], x).kthvalue(k + 1, dim=1).values # +1: the sample itself is at 0
        bar.update(1)
    return radii

def compute_precision_recall(real_features, gen_features, k=3, max_block=1<<26, progress=False):
    real, gen = real_features.to(torch.float32), gen_features.to(real_features.device, torch.float32)
    if min(real.shape[0], gen.shape[0]) <= k:
        raise FIDError(f'precision/recall with k={k} needs more than {k} samples in each set')
    blocks = [_row_blocks(n, c, max_block) for n, c in [(len(real), len(real)), (len(gen), len(gen)), (len(gen), len(real))]]
    with tqdm.tqdm(total=sum(len(b) for b in blocks), unit='block', desc='precision/recall', disable=not progress) as bar:
        real_radii = _knn_radii(real, k, max_block, bar)
        gen_radii = _knn_radii(gen, k, max_block, bar)
        gen_inside = torch.zeros([gen.shape[0]], dtype=torch.bool, device=real.device)
        real_inside = torch.zeros([real.shape[0]], dtype=torch.bool, device=real.device)
        for rows in blocks[2]:
            dist_rows = torch.cdist(gen[rows], real)
            gen_inside[rows] = (dist_rows <= real_radii[np.newaxis]).any(dim=1)
            real_inside |= (dist_rows <= gen_radii[rows, np.newaxis]).any(dim=0)
            bar.update(1)
    return gen_inside.double().mean().item(), real_inside.double().mean().item()

#----------------------------------------------------------------------------
# Statistics files. mu and sigma keep EDM's format; extra keys say how they were made.

def load_stats(path):
    """A statistics file (path or URL) as a dict, with 'detector' filled in for EDM's files."""
    try:
        with _open_url(path, verbose=(dist.get_rank() == 0)) as f:
            stats = dict(np.load(f))
    except FIDError:
        raise
    except Exception as err:
        raise FIDError(f'{path}: cannot read the statistics as .npz ({_one_line(err)})') from None
    missing = [key for key in ['mu', 'sigma'] if key not in stats]
    if missing:
        raise FIDError(f'{path}: no {"/".join(missing)} in the file (keys: {", ".join(sorted(stats)) or "none"}); '
            f'make reference statistics with "fid.py ref"')
    stats['detector'] = str(stats.get('detector', DETECTOR_NAME))
    return stats

def save_stats(path, **stats):
    # Written to a temporary name and renamed, so an interrupted save never leaves a truncated file.
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    with dnnlib.util.atomic_write(path) as temp, open(temp, 'wb') as f:
        np.savez(f, **stats)

def detector_fields(det):
    return dict(detector=det.id, detector_url=det.url, detector_sha256=det.sha256, comparable=det.standard)

def images_fingerprint(path, exclude=()):
    # Identifies the image set by its file list, sizes and modification times (no reading of contents).
    exclude = {os.path.abspath(p) for p in exclude}
    if not os.path.exists(path):
        raise FIDError(f'{path}: no such directory or zip file')
    if os.path.isdir(path):
        files = sorted(os.path.join(root, name) for root, _dirs, names in os.walk(path) for name in names)
        files = [f for f in files if os.path.abspath(f) not in exclude]
    else:
        files = [path]
    entries = [(os.path.relpath(f, path) if os.path.isdir(path) else os.path.basename(f), os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files]
    return hashlib.sha256(json.dumps(entries).encode('utf-8')).hexdigest()

def default_stats_path(image_path):
    return os.path.normpath(image_path) + '.fid-stats.npz'

#----------------------------------------------------------------------------
