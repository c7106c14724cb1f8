"""Frechet Inception Distance (FID), compatible with EDM's fid.py, plus improved precision and recall.

Reference statistics are EDM's .npz files (mu, sigma). Features come from StyleGAN3's Inception-v3
detector, the one EDM uses, so the numbers are comparable with published ones. Any other detector
(--detector) gives numbers that are labelled NOT comparable wherever they appear; --detector=standin
is a small built-in random-feature network for quick checks on machines that cannot download Inception.

The computation is metrics/fid.py (also used by the training monitor); this program maps its
errors to messages that name the flag to change. EDM's names calculate_inception_stats and
calculate_fid_from_inception_stats can still be imported from here."""

import functools
import os
import click
import numpy as np
import torch
from metrics.fid import (DETECTOR_NAME, STANDIN, NOT_COMPARABLE, FIDError, TooFewImages, calculate_fid_from_inception_stats,
    calculate_inception_stats, calculate_kid, comparison_fields, compute_precision_recall, default_stats_path, detector_fields,
    detector_note, images_fingerprint, load_stats, not_standard, open_detector, open_images, rank0_first, save_stats,
    build_detector, kid_subset, KID_REF_FEATURES, KID_SUBSETS, KID_SUBSET_SIZE)
from torch_utils import distributed as dist

#----------------------------------------------------------------------------
# The library's errors as one-line messages that name the flag to change.

def flag_errors(command):
    """Run command with the library's FIDError turned into click's one-line error."""
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except TooFewImages as err:
            raise click.ClickException(f'{err.path}: found {err.found} images, need --num={err.needed}; generate more or lower --num') from None
        except FIDError as err:
            raise click.ClickException(str(err)) from None
    return wrapper

def open_detector_of(detector, rank):
    """The --detector's file, downloaded by rank 0 first; for the standard one, say how to do without it."""
    try:
        return rank0_first(lambda: open_detector(detector, verbose=(rank == 0)))
    except FIDError as err:
        if detector is None:
            raise FIDError(f'{err}. Without it, --detector={STANDIN} gives a quick FID that is {NOT_COMPARABLE} (see docs/fid.md)') from None
        raise

#----------------------------------------------------------------------------

@click.group()
def main():
    """Calculate Frechet Inception Distance (FID) and improved precision/recall.

    Examples:

    \b
    # Generate 50000 images and save them as fid-tmp/*/*.png
    torchrun --standalone --nproc_per_node=1 generate.py --outdir=fid-tmp --seeds=0-49999 --subdirs \\
        --network=https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-cifar10-32x32-cond-vp.pkl

    \b
    # Calculate FID
    torchrun --standalone --nproc_per_node=1 fid.py calc --images=fid-tmp \\
        --ref=https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/cifar10-32x32.npz

    \b
    # Compute dataset reference statistics (with features, for --pr)
    python fid.py ref --data=datasets/my-dataset.zip --dest=fid-refs/my-dataset.npz --save-features

    \b
    # With KID: the reference keeps a random subset of its features
    python fid.py ref --data=datasets/my-dataset.zip --dest=fid-refs/my-dataset-kid.npz --kid
    python fid.py calc --images=fid-tmp --ref=fid-refs/my-dataset-kid.npz --kid

    \b
    # Without internet access: a quick FID with the built-in stand-in, NOT comparable to published FID
    python fid.py ref --data=datasets/my-dataset.zip --dest=fid-refs/my-dataset-standin.npz --detector=standin
    python fid.py calc --images=fid-tmp --ref=fid-refs/my-dataset-standin.npz --detector=standin
    """

def refuse_other_detector(ref, ref_path, detector):
    """Before any download: a reference made with another detector than --detector names (the
    standard Inception when None) cannot be compared; say which one made it."""
    made_by = ref['detector']
    if detector is None and made_by != DETECTOR_NAME:
        hint = STANDIN if made_by.startswith(STANDIN) else str(ref.get('detector_url', 'the same detector'))
        raise click.ClickException(f'{ref_path} was computed with detector {made_by}, not the standard {DETECTOR_NAME}; '
                                   f'pass --detector={hint} (as for "fid.py ref")')

def ref_kid_features(ref):
    """The reference's features for KID: all of them (--save-features) or its KID subset (--kid); None without."""
    return ref.get('features', ref.get('kid_features'))

#----------------------------------------------------------------------------

detector_option = click.option('--detector', help=f'Feature detector other than the standard Inception-v3, or "{STANDIN}" for the built-in stand-in (no download); results are NOT comparable to published FID', metavar='PATH|URL|standin', type=str, default=None)
workers_option = click.option('--workers', help='Data loader worker processes  [default: 3, or the number of CPU cores if fewer]', metavar='INT', type=click.IntRange(min=0), default=None)

@main.command()
@click.option('--images', 'image_path', help='Path to the images', metavar='PATH|ZIP',              type=str, required=True)
@click.option('--ref', 'ref_path',      help='Dataset reference statistics ', metavar='NPZ|URL',    type=str, required=True)
@click.option('--num', 'num_expected',  help='Number of images to use', metavar='INT',              type=click.IntRange(min=2), default=50000, show_default=True)
@click.option('--seed',                 help='Random seed for selecting the images', metavar='INT', type=int, default=0, show_default=True)
@click.option('--batch',                help='Maximum batch size', metavar='INT',                   type=click.IntRange(min=1), default=64, show_default=True)
@click.option('--pr',                   help='Also report precision and recall (k=3); --ref needs features', is_flag=True)
@click.option('--kid',                  help=f'Also report KID (mean and std over {KID_SUBSETS} subsets of {KID_SUBSET_SIZE}); --ref needs features', is_flag=True)
@click.option('--save-stats', 'stats_path', help='Where to keep the statistics of the images  [default: IMAGES.fid-stats.npz]', metavar='NPZ', type=str, default=None)
@detector_option
@workers_option

@flag_errors
def calc(image_path, ref_path, num_expected, seed, batch, pr, kid, stats_path, detector, workers):
    """Calculate FID for a given set of images.

    With a detector other than the standard Inception, the FID line also gives, as a point of
    comparison, the FD between two random halves of the reference set (see docs/fid.md)."""
    torch.multiprocessing.set_start_method('spawn', force=True)
    dist.init()
    rank, device = dist.get_rank(), dist.device()
    stats_path = default_stats_path(image_path) if stats_path is None else stats_path

    # Fail early: reference file, detector, and whether they belong together.
    ref = None
    if rank == 0:
        dist.print0(f'Loading dataset reference statistics from "{ref_path}"...')
        ref = load_stats(ref_path)
        if pr and 'features' not in ref:
            raise click.ClickException(f'{ref_path}: no features for --pr; make the reference with "fid.py ref --save-features"')
        if kid and ref_kid_features(ref) is None:
            raise click.ClickException(f'{ref_path}: no features for --kid (it holds only {"/".join(k for k in ["mu", "sigma"] if k in ref)}, '
                f'as EDM\'s reference files do); make the reference with "fid.py ref --kid" (or --save-features)')
    dataset_obj = open_images(image_path, num_expected, seed) # before any download
    if rank == 0:
        refuse_other_detector(ref, ref_path, detector)
    det = open_detector_of(detector, rank)
    if rank == 0 and ref['detector'] != det.id:
        raise click.ClickException(f'{ref_path} was computed with detector {ref["detector"]}, this run uses {det.id}; '
            f'use the same --detector for "fid.py ref" and "fid.py calc"')

    # Reuse the statistics of these images if nothing changed since they were saved.
    gen = None
    if rank == 0:
        key = dict(images=images_fingerprint(image_path, exclude=[stats_path]), num=num_expected, seed=seed, detector=det.id)
        if os.path.isfile(stats_path):
            try:
                saved = dict(np.load(stats_path))
                if all(str(saved.get(k)) == str(v) for k, v in key.items()) and (not (pr or kid) or 'features' in saved) \
                        and (det.standard or 'halves_fd' in saved):
                    gen = saved
                    dist.print0(f'Reusing statistics from "{stats_path}" (images unchanged)')
            except Exception: # unreadable or foreign file: recompute and overwrite
                pass
    reuse = torch.tensor([int(gen is not None)], device=device)
    if dist.get_world_size() > 1:
        torch.distributed.broadcast(reuse, src=0)

    if not reuse.item():
        result = calculate_inception_stats(image_path=image_path, num_expected=num_expected, seed=seed, max_batch_size=batch,
            num_workers=workers, device=device, detector_net=build_detector(det, device), return_features=(pr or kid or not det.standard),
            dataset_obj=dataset_obj)
        if rank == 0:
            gen = dict(mu=result[0], sigma=result[1], **detector_fields(det), **{k: v for k, v in key.items() if k != 'detector'})
            gen.update(comparison_fields(det, result))
            if pr or kid:
                gen['features'] = result[2].cpu().numpy()
            try:
                save_stats(stats_path, **gen)
                dist.print0(f'Saved statistics of the images to "{stats_path}"')
            except OSError as err:
                dist.print0(f'Warning: cannot save statistics to "{stats_path}" ({" ".join(str(err).split())}); continuing')

    if rank == 0:
        if ref['mu'].shape != gen['mu'].shape or ref['sigma'].shape != gen['sigma'].shape:
            raise click.ClickException(f'{ref_path} has {ref["mu"].shape[0]}-d statistics, the detector gives {gen["mu"].shape[0]}-d')
        if pr:
            precision, recall = compute_precision_recall(torch.as_tensor(ref['features'], device=device),
                torch.as_tensor(gen['features'], device=device), k=3, progress=True)
            print(f'precision {precision:g}{detector_note(det)}')
            print(f'recall {recall:g}{detector_note(det)}')
        if kid:
            ref_features = ref_kid_features(ref)
            if ref_features.shape[1] != gen['features'].shape[1]:
                raise click.ClickException(f'{ref_path} has {ref_features.shape[1]}-d features, the detector gives {gen["features"].shape[1]}-d')
            dist.print0('Calculating KID...')
            size = min(KID_SUBSET_SIZE, len(ref_features), len(gen['features']))
            kid_mean, kid_std = calculate_kid(gen['features'], ref_features)
            print(f'KID {kid_mean:g} std {kid_std:g} ({KID_SUBSETS} subsets of {size}){detector_note(det)}')
        dist.print0('Calculating FID...')
        fid = calculate_fid_from_inception_stats(gen['mu'], gen['sigma'], ref['mu'], ref['sigma'])
        print(f'{fid:g}{detector_note(det, ref, gen)}')
    dist.barrier()

#----------------------------------------------------------------------------

@main.command()
@click.option('--data', 'dataset_path', help='Path to the dataset', metavar='PATH|ZIP', type=str, required=True)
@click.option('--dest', 'dest_path',    help='Destination .npz file (must not exist)', metavar='NPZ',    type=str, required=True)
@click.option('--batch',                help='Maximum batch size', metavar='INT',       type=click.IntRange(min=1), default=64, show_default=True)
@click.option('--save-features',        help='Also store the features (for calc --pr and --kid)', is_flag=True)
@click.option('--kid',                  help=f'Also store a random subset of at most {KID_REF_FEATURES} features (for calc --kid)', is_flag=True)
@detector_option
@workers_option

@flag_errors
def ref(dataset_path, dest_path, batch, save_features, kid, detector, workers):
    """Calculate dataset reference statistics needed by 'calc'."""
    torch.multiprocessing.set_start_method('spawn', force=True)
    dist.init()
    device = dist.device()

    # Fail early, before any download: an existing --dest (refused, as dataset_tool.py does), missing or bad data.
    if os.path.exists(dest_path):
        raise click.ClickException(f'--dest {dest_path} already exists; delete it or choose another name')
    dataset_obj = open_images(dataset_path)
    det = open_detector_of(detector, dist.get_rank())
    result = calculate_inception_stats(image_path=dataset_path, max_batch_size=batch, num_workers=workers, device=device,
        detector_net=build_detector(det, device), return_features=(save_features or kid or not det.standard), dataset_obj=dataset_obj)
    dist.print0(f'Saving dataset reference statistics to "{dest_path}"...')
    if dist.get_rank() == 0:
        stats = dict(mu=result[0], sigma=result[1], **detector_fields(det), **comparison_fields(det, result))
        if save_features:
            stats['features'] = result[2].cpu().numpy()
        elif kid:
            stats['kid_features'] = kid_subset(result[2].cpu().numpy())
        save_stats(dest_path, **stats)
        if not det.standard:
            print(f'Warning: {dest_path} is {not_standard(det)}')
    dist.barrier()
    dist.print0('Done.')

#----------------------------------------------------------------------------

if __name__ == "__main__":
    main()

#----------------------------------------------------------------------------
