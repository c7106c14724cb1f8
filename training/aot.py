"""Approximated Optimal Transport (AOT) noise pairing from the paper
"Improving Diffusion-Based Generative Models via Approximated Optimal
Transport" (Kim et al., arXiv 2403.05069).

A pool of images and an equally sized pool of standard-normal noises are
paired so that the summed Euclidean distance between each image and its noise
is minimal. The pairing only permutes the noise, so the noise stays exactly
standard normal. For conditional data the assignment is solved within each
class, since class-agnostic pairing hurts conditional models (C2OT)."""

import numpy as np
import scipy.optimize
import torch

SOLVERS = ('scipy', 'lap')

#----------------------------------------------------------------------------
# The one place a solver name is checked: known, and its package importable.
# Returns the solve function (float64 cost matrix -> column of every row).

def check_solver(solver):
    if solver not in SOLVERS:
        raise ValueError(f"Unknown AOT solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    if solver == 'lap':
        try:
            import lap
        except ImportError:
            raise ValueError("AOT solver 'lap' needs the lap package: pip install lap (or use solver 'scipy')") from None
        return lambda cost: lap.lapjv(cost, extend_cost=False)[1]
    return _solve_scipy

def _solve_scipy(cost):
    rows, cols = scipy.optimize.linear_sum_assignment(cost)
    assert (rows == np.arange(len(cost))).all() # scipy returns rows in order for square problems
    return cols

#----------------------------------------------------------------------------
# Class index per image from one-hot [N, C] or integer [N] labels;
# None when there are no labels (None or an empty label vector [N, 0]).

def class_indices(labels, num_images):
    if labels is None:
        return None
    labels = torch.as_tensor(labels)
    if labels.shape[0] != num_images:
        raise ValueError(f'AOT labels have {labels.shape[0]} rows but there are {num_images} images; pass one label per image')
    if labels.ndim == 2:
        if labels.shape[1] == 0:
            return None
        return labels.argmax(dim=1)
    if labels.ndim == 1:
        if labels.is_floating_point() or labels.is_complex():
            raise ValueError('AOT labels of shape [N] must be integer class indices; pass one-hot labels as [N, C]')
        return labels.long()
    raise ValueError(f'AOT labels must be one-hot [N, C] or class indices [N], got shape {list(labels.shape)}')

#----------------------------------------------------------------------------
# Pair images with noise: returns idx (LongTensor [N] on the input device)
# such that image i gets noise[idx[i]] and sum_i |images[i] - noise[idx[i]]|
# is minimal. With labels, noise slot j belongs to the class of image j and
# the problem is solved per class, so labels[idx] == labels.

def assign(images, noise, labels=None, solver='scipy'):
    if not (isinstance(images, torch.Tensor) and isinstance(noise, torch.Tensor)):
        raise TypeError('AOT assign expects images and noise as torch tensors')
    if images.ndim < 2 or images.shape != noise.shape:
        raise ValueError(f'AOT images {list(images.shape)} and noise {list(noise.shape)} must have the same shape [N, ...]')
    solve = check_solver(solver)
    num = images.shape[0]
    x = images.detach().flatten(1).to(torch.float32)
    n = noise.detach().flatten(1).to(torch.float32)
    classes = class_indices(labels, num)
    groups = [torch.arange(num, device=images.device)] if classes is None else \
        [torch.nonzero(classes == c).flatten().to(images.device) for c in torch.unique(classes)]

    idx = torch.empty(num, dtype=torch.long)
    for members in groups:
        # Distances on the tensors' device, float32 as the reference; the solver runs on CPU.
        cost = torch.cdist(x[members], n[members]).cpu().numpy().astype(np.float64)
        cols = torch.as_tensor(solve(cost), dtype=torch.long)
        members = members.cpu()
        idx[members] = members[cols]
    return idx.to(images.device)

#----------------------------------------------------------------------------
# Summed Euclidean distance between images[i] and noise[idx[i]] in float64
# (identity pairing when idx is None).

def pairing_cost(images, noise, idx=None):
    if images.shape != noise.shape:
        raise ValueError(f'AOT images {list(images.shape)} and noise {list(noise.shape)} must have the same shape [N, ...]')
    if idx is not None:
        noise = noise[idx.to(noise.device)]
    return (images.detach().double() - noise.detach().double()).flatten(1).norm(dim=1).sum().item()

#----------------------------------------------------------------------------
