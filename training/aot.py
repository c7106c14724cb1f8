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
            import lap # checked here, even when training.lap_helper is already imported
            from training import lap_helper
        except ImportError:
            raise ValueError("AOT solver 'lap' needs the lap package: pip install lap (or use solver 'scipy')") from None
        return lap_helper.solve
    return _solve_scipy

def _solve_scipy(cost):
    rows, cols = scipy.optimize.linear_sum_assignment(cost)
    assert (rows == np.arange(len(cost))).all() # scipy returns rows in order for square problems
    return cols

def solve_costs(costs, solver):
    """Columns assigned to the rows of each float32 cost matrix (a list: one call solves all the
    groups of a pool)."""
    solve = check_solver(solver)
    return [solve(cost.astype(np.float64)) for cost in costs]

#----------------------------------------------------------------------------
# Moving a tensor to the device from the host through pinned memory, asynchronously:
# the host does not wait for the work already queued on the device.

def upload(t, device):
    device = torch.device(device)
    if t.device.type == 'cpu' and device.type == 'cuda':
        t = t.pin_memory()
    return t.to(device, non_blocking=True)

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
# Indices (ascending, numpy) of the images of each class present, in class
# order; one group of all images when classes is None. On the host: labels
# are known there before they are uploaded, so grouping waits for no device.

def class_groups(classes, num_images):
    if classes is None:
        return [np.arange(num_images)]
    classes = np.asarray(classes)
    order = np.argsort(classes, kind='stable')
    return np.split(order, np.flatnonzero(np.diff(classes[order])) + 1)

#----------------------------------------------------------------------------
# Distance matrices cdist(x[g], n[g]) (float32 numpy) between rows of images x
# and noise n [N, D] for every group g of row indices. Each read back from a
# device waits for everything queued on its stream, so all groups are computed
# together and copied to the host at once, whatever their number: groups are
# padded (with their last row) to the largest of their power-of-two size class,
# one batched cdist per class (at most 2x the rows, 4x the entries).

def group_costs(x, n, groups):
    sizes = [len(g) for g in groups]
    size_classes = {}
    for i, size in enumerate(sizes):
        size_classes.setdefault((size - 1).bit_length(), []).append(i)
    batches = [(members, max(sizes[i] for i in members)) for _, members in sorted(size_classes.items())]
    rows = np.concatenate([np.pad(groups[i], (0, m - sizes[i]), mode='edge') for members, m in batches for i in members])
    rows = upload(torch.from_numpy(rows), x.device)
    blocks, start = [], 0
    for members, m in batches:
        part = rows[start : start + len(members) * m]
        start += len(members) * m
        blocks.append(torch.cdist(x[part].view(len(members), m, -1), n[part].view(len(members), m, -1)).flatten())
    flat = torch.cat(blocks).cpu().numpy()
    costs, start = [None] * len(groups), 0
    for members, m in batches:
        block = flat[start : start + len(members) * m * m].reshape(len(members), m, m)
        start += len(members) * m * m
        for j, i in enumerate(members):
            costs[i] = block[j, :sizes[i], :sizes[i]]
    return costs

#----------------------------------------------------------------------------
# The permutation idx (numpy) that gives image i the noise idx[i], from the
# columns that the solver assigned to the rows of each group's cost matrix.

def pairing(groups, cols):
    idx = np.empty(sum(len(g) for g in groups), dtype=np.int64)
    for members, c in zip(groups, cols):
        idx[members] = members[c]
    return idx

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
    check_solver(solver)
    num = images.shape[0]
    classes = class_indices(labels, num)
    groups = class_groups(None if classes is None else classes.cpu(), num)
    # Distances on the tensors' device, float32 as the reference; the solver runs on the CPU.
    costs = group_costs(images.detach().flatten(1).to(torch.float32), noise.detach().flatten(1).to(torch.float32), groups)
    return torch.from_numpy(pairing(groups, solve_costs(costs, solver))).to(images.device)

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
