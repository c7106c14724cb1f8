"""Approximated Optimal Transport (AOT) noise pairing from the paper
"Improving Diffusion-Based Generative Models via Approximated Optimal
Transport" (Kim et al., arXiv 2403.05069).

A pool of images and an equally sized pool of standard-normal noises are
paired so that the summed Euclidean distance between each image and its noise
is minimal. The pairing only permutes the noise, so the noise stays exactly
standard normal. For conditional data the assignment is solved within each
class, since class-agnostic pairing hurts conditional models (C2OT).

Solvers 'scipy' and 'lap' solve the dense P x P cost matrix exactly (cubic time); 'knn' is for
pools of 16,384 and more: distances in chunks on the device, a sparse candidate graph to the host,
an exact matching on it (the same pairing cost as the exact solvers wherever measured)."""

import numpy as np
import scipy.optimize
import scipy.sparse
import scipy.sparse.csgraph
import torch

SOLVERS = ('scipy', 'lap', 'knn')
DENSE_SOLVERS = ('scipy', 'lap') # solve a dense cost matrix; 'knn' never needs one

# 'knn': exact minimum-cost matching on the graph of each image's KNN_K cheapest noises, chosen
# after entropic column potentials have been subtracted (see column_potentials). Measured in
# docs/aot-scale.md ("Large-pool solver").
KNN_K = 32
KNN_EPS = (0.3, 0.1, 0.03) # Sinkhorn temperatures, one pass each, relative to the spread of a row's distances
KNN_CHUNK = 1024 # rows of distances computed at once: chunk x noises float32 on the device

#----------------------------------------------------------------------------

def check_solver(solver):
    """The one place a solver name is checked: known, and its package importable. Returns the
    solve function of a dense solver (float64 cost matrix -> column of every row), None for 'knn'
    (which pairs from the images and noise, solve_knn)."""
    if solver not in SOLVERS:
        raise ValueError(f"Unknown AOT solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    if solver == 'lap':
        try:
            import lap # noqa: F401 (optional package)
        except ImportError:
            raise ValueError("AOT solver 'lap' needs the lap package: pip install lap (or use solver 'scipy')") from None
        return _solve_lap
    return None if solver == 'knn' else _solve_scipy

def _solve_scipy(cost):
    rows, cols = scipy.optimize.linear_sum_assignment(cost)
    assert (rows == np.arange(len(cost))).all() # scipy returns rows in order for square problems
    return cols

def _solve_lap(cost):
    # lap holds the GIL for a whole solve: harmless in the pool builder, whose DataLoader workers
    # are processes of their own. The same pairings as scipy, faster (docs/benchmarks.md).
    import lap
    return lap.lapjv(cost, extend_cost=False)[1]

#----------------------------------------------------------------------------

def upload(t, device):
    """t moved to the device from the host through pinned memory, asynchronously: the host does not
    wait for the work already queued on the device."""
    device = torch.device(device)
    if t.device.type == 'cpu' and device.type == 'cuda':
        t = t.pin_memory()
    return t.to(device, non_blocking=True)

def class_indices(labels, num_images):
    """Class index per image from one-hot [N, C] or integer [N] labels; None when there are no
    labels (None or an empty label vector [N, 0])."""
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

def class_groups(classes, num_images):
    """Indices (ascending, numpy) of the images of each class present, in class order; one group of
    all images when classes is None. On the host: labels are known there before they are uploaded,
    so grouping waits for no device."""
    if classes is None:
        return [np.arange(num_images)]
    classes = np.asarray(classes)
    order = np.argsort(classes, kind='stable')
    return np.split(order, np.flatnonzero(np.diff(classes[order])) + 1)

def group_costs(x, n, groups):
    """Distance matrices cdist(x[g], n[g]) (float32 numpy) between rows of images x and noise n
    [N, D] for every group g of row indices.

    Each read back from a device waits for everything queued on its stream, so all groups are
    computed together and copied to the host at once, whatever their number: groups are padded
    (with their last row) to the largest of their power-of-two size class, one batched cdist per
    class (at most 2x the rows, 4x the entries)."""
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
# Solver 'knn', for pools too large for a dense assignment (cubic time, P x P memory): distances
# are computed in row chunks on the tensors' device and only each row's k cheapest candidates
# reach the host, where an exact sparse matching (scipy's LAPJVsp) pairs them.
#
# The candidates are chosen by distance minus a column potential v_j. Plain nearest neighbours do
# not work in high dimension: noises of small norm are near to every image, so most rows list the
# same few "hub" columns and most noises are in no row's list (docs/aot-scale.md, "Why the
# potentials"). Subtracting a per-column constant does not change which permutation is optimal,
# and with v from a few passes of entropic OT (Sinkhorn) the optimal partner of nearly every row
# is among its 32 cheapest.

def _chunks(m, chunk):
    return (slice(start, min(start + chunk, m)) for start in range(0, m, chunk))

def column_potentials(x, n, eps=KNN_EPS, chunk=KNN_CHUNK):
    """Entropic-OT dual potential v [c] (a tensor on n's device) of the noises n [c, D] against the
    image rows x [m, D], from len(eps) passes of chunked log-domain Sinkhorn at temperatures eps
    times the mean spread of a row's distances; pass it to knn_rows as offsets."""
    # Uniform marginals, one pass over the rows per temperature: each chunk gives its rows' u_i
    # (rows are independent) and adds to the column log-sum-exp that makes v. Rows split across
    # devices would all-reduce `lse` (and `scale`) and keep the rest local. The temperature's
    # scale comes from the first chunk of rows: a sample is enough to set it.
    first = torch.cdist(x[:chunk], n)
    scale = first.std(dim=1).mean() if first.shape[1] > 1 else first.new_zeros([])
    v = first.new_zeros(first.shape[1])
    if not scale > 0: # all distances equal: any pairing is optimal
        return v
    for e in eps:
        t = e * scale
        lse = torch.full_like(v, -float('inf'))
        for rows in _chunks(len(x), chunk):
            d = first if rows.start == 0 else torch.cdist(x[rows], n)
            u = -t * torch.logsumexp((v - d) / t, dim=1)
            lse = torch.logaddexp(lse, torch.logsumexp((u[:, None] - d) / t, dim=0))
        v = -t * lse
    return v

def knn_rows(x, n, k, chunk=KNN_CHUNK, offsets=None):
    """For image rows x [m, D] and candidate noises n [c, D] (float32, same device): the k' =
    min(k, c) smallest Euclidean distances of every row, ascending, as (values float32 [m, k'],
    cols int64 [m, k']) numpy arrays. Distances are computed `chunk` rows at a time on the
    device. With offsets [c] (column_potentials) rows keep the k' columns of smallest distance
    minus offset instead, still returning the plain distances."""
    values, cols = [], []
    for rows in _chunks(len(x), chunk):
        d = torch.cdist(x[rows], n)
        key = d if offsets is None else d - offsets
        idx = torch.topk(key, min(k, d.shape[1]), dim=1, largest=False).indices
        values.append(d.gather(1, idx))
        cols.append(idx)
    # One copy of each to the host, after all chunks are queued.
    return torch.cat(values).to(torch.float32).cpu().numpy(), torch.cat(cols).cpu().numpy().astype(np.int64)

def solve_sparse(values, cols, num_cols, cost=None, stats=None, offsets=None):
    """Column in [0, num_cols) assigned to each row (numpy int64; distinct, a permutation when there
    are num_cols rows) minimising the summed cost over the sparse graph whose row i has the edges
    cols[i] with costs values[i] (knn_rows). When that graph has no perfect matching, the rows left
    unmatched by a maximum matching get edges to all the columns it left free, with their costs from
    cost(rows, cols) -> dense [len(rows), len(cols)] (without it each counts as the row's dearest
    listed cost, less offsets), so a permutation is always returned. offsets [num_cols] (column_potentials, as
    numpy), when there are num_cols rows, are subtracted from the costs: the same optimal permutation
    (a constant per column), found several times faster. stats (a dict) receives 'unmatched', the
    number of rows left unmatched by the sparse graph."""
    values = np.asarray(values, dtype=np.float64)
    cols = np.asarray(cols, dtype=np.int64)
    m = values.shape[0]
    if values.shape != cols.shape or values.ndim != 2 or m > num_cols:
        raise ValueError(f'AOT solve_sparse needs values and cols of one shape [m, k] with m <= num_cols, got {list(values.shape)}, {list(cols.shape)} and {num_cols}')
    rows = np.repeat(np.arange(m), values.shape[1])
    graph = scipy.sparse.csr_matrix((np.ones(rows.size), (rows, cols.ravel())), shape=(m, num_cols))
    matched = scipy.sparse.csgraph.maximum_bipartite_matching(graph, perm_type='column')
    left = np.flatnonzero(matched < 0)
    # Reduced costs: with potentials close to the optimal duals, LAPJVsp's augmenting paths are short
    # and the matching is several times faster (measured: docs/aot-scale.md, "Large-pool solver").
    # Only for a perfect matching, where every column is used once, does a constant per column not
    # move the optimum.
    shift = np.asarray(offsets, dtype=np.float64) if offsets is not None and m == num_cols else np.zeros(num_cols)
    values = values - shift[cols]
    lowest = values.min(axis=1) if values.shape[1] else np.zeros(m)
    weights = [values.ravel()]
    if len(left):
        free = np.setdiff1d(np.arange(num_cols), matched[matched >= 0])
        block = np.asarray(cost(left, free), dtype=np.float64) - shift[free] if cost is not None else \
                np.repeat(values[left].max(axis=1, initial=0)[:, None], len(free), axis=1)
        lowest[left] = np.minimum(lowest[left], block.min(axis=1))
        rows = np.concatenate([rows, np.repeat(left, len(free))])
        cols = np.concatenate([cols.ravel(), np.tile(free, len(left))])
        weights.append(block.ravel())
    # A constant per row leaves the optimal matching as it is; weights >= 1 because scipy drops
    # explicit zeros as missing edges. (No edge repeats: a maximum matching leaves no edge between
    # an unmatched row and a free column.)
    weights = np.concatenate(weights) - lowest[rows] + 1
    graph = scipy.sparse.csr_matrix((weights, (rows, cols.ravel())), shape=(m, num_cols))
    r, c = scipy.sparse.csgraph.min_weight_full_bipartite_matching(graph)
    assign = np.empty(m, dtype=np.int64)
    assign[r] = c
    if stats is not None:
        stats['unmatched'] = len(left)
    return assign

def solve_knn(x, n, k=None, chunk=KNN_CHUNK, stats=None):
    """Solver 'knn' for one group: the column of noise n [c, D] assigned to each image row of x
    [m, D] (numpy int64), from column_potentials, knn_rows (k = KNN_K) and solve_sparse, with the
    true distances for the fallback rows."""
    k = KNN_K if k is None else k
    offsets = None if k >= len(n) else column_potentials(x, n, KNN_EPS, chunk) # a complete graph needs none
    values, cols = knn_rows(x, n, k, chunk, offsets)
    cost = lambda r, c: torch.cdist(x[upload(torch.from_numpy(r), x.device)], n[upload(torch.from_numpy(c), n.device)]).cpu().numpy()
    return solve_sparse(values, cols, len(n), cost, stats, offsets=None if offsets is None else offsets.cpu().numpy())

#----------------------------------------------------------------------------

def pairing(groups, cols):
    """The permutation idx (numpy) that gives image i the noise idx[i], from the columns that the
    solver assigned to the rows of each group's cost matrix."""
    idx = np.empty(sum(len(g) for g in groups), dtype=np.int64)
    for members, c in zip(groups, cols):
        idx[members] = members[c]
    return idx

def _mean_distance(x, n):
    return (x - n).norm(dim=1).mean().item()

def _stats(before, after, groups, num):
    return dict(cost_before=before, cost_after=after, alone=sum(len(g) for g in groups if len(g) == 1) / num)

def _flat(images, noise):
    if not (isinstance(images, torch.Tensor) and isinstance(noise, torch.Tensor)):
        raise TypeError('AOT assign expects images and noise as torch tensors')
    if images.ndim < 2 or images.shape != noise.shape:
        raise ValueError(f'AOT images {list(images.shape)} and noise {list(noise.shape)} must have the same shape [N, ...]')
    # Distances on the tensors' device, float32 as the reference; the solvers run on the CPU.
    return images.detach().flatten(1).to(torch.float32), noise.detach().flatten(1).to(torch.float32)

def _groups(labels, num):
    classes = class_indices(labels, num)
    return class_groups(None if classes is None else classes.cpu(), num)

def assign(images, noise, labels=None, solver='scipy'):
    """Pair images with noise [N, ...] (torch tensors of one shape, on any device): the AOT pairing,
    the only place that composes class groups, costs, solve and permutation.

    Returns (idx, stats): idx (LongTensor [N] on the images' device) such that image i gets noise
    idx[i] and sum_i |images[i] - noise[idx[i]]| is minimal; with labels (one-hot [N, C] or class
    indices [N]) noise slot j belongs to the class of image j and the problem is solved per class,
    so labels[idx] == labels. stats (plain numbers): cost_before and cost_after, the mean
    image-noise distance before (noise i for image i) and after pairing, and alone, the fraction of
    images alone in their class, for which pairing can do nothing. Labels on the host save a wait
    for the device."""
    x, n = _flat(images, noise)
    solve = check_solver(solver)
    num = x.shape[0]
    groups = _groups(labels, num)
    if solve is None: # knn: no cost matrix; the distances before and after from the tensors
        rows = [upload(torch.from_numpy(g), x.device) for g in groups]
        cols = [solve_knn(x[r], n[r]) for r in rows]
        idx = upload(torch.from_numpy(pairing(groups, cols)), images.device)
        return idx, _stats(_mean_distance(x, n), _mean_distance(x, n[idx]), groups, num)
    costs = group_costs(x, n, groups)
    cols = [solve(cost.astype(np.float64)) for cost in costs]
    # Before pairing each image has noise slot i: the diagonals of the costs (no more copies).
    before = sum(float(np.trace(cost, dtype=np.float64)) for cost in costs) / num
    after = sum(float(cost[np.arange(len(c)), c].astype(np.float64).sum()) for cost, c in zip(costs, cols)) / num
    return upload(torch.from_numpy(pairing(groups, cols)), images.device), _stats(before, after, groups, num)

def unpaired_stats(images, noise, labels=None):
    """assign's stats for images left with their own noise (plain EDM): no pairing, no gain."""
    x, n = _flat(images, noise)
    before = _mean_distance(x, n)
    return _stats(before, before, _groups(labels, x.shape[0]), x.shape[0])

def nearest(images, candidates):
    """Nearest-of-K noise (Improved Immiscible Diffusion, Li et al. 2025): each image [N, ...] takes
    the nearest (Euclidean, float32 as assign) of its own K candidate noises [N, K, ...]; no noise is
    shared, so classes need no grouping and no matrix exceeds N x K.

    Returns (noise [N, ...] from candidates, stats): assign's stats, with cost_before the mean
    distance to each image's first candidate (what plain EDM would have drawn)."""
    if images.ndim < 2 or candidates.ndim != images.ndim + 1 or candidates.shape[:1] + candidates.shape[2:] != images.shape:
        raise ValueError(f'nearest-of-K candidates {list(candidates.shape)} must be [N, K, ...] for images {list(images.shape)}')
    x = images.detach().flatten(1).to(torch.float32)
    c = candidates.detach().flatten(2).to(torch.float32)
    dist = (c - x[:, None]).norm(dim=2) # [N, K]
    choice = dist.argmin(dim=1)
    rows = torch.arange(len(x), device=x.device)
    before, after = torch.stack([dist[:, 0].mean(), dist[rows, choice].mean()]).tolist() # one read from the device
    return candidates[rows, choice], dict(cost_before=before, cost_after=after, alone=0.0)

def noise_stats(images, noise):
    """How far paired noise [N, ...] leans towards its images: mean norm over sqrt(D) (1 for standard
    normal noise, which AOT's permutation keeps) and mean projection on the image's direction (0 with
    standard deviation 1/sqrt(N) for independent noise). 0-dim tensors on the noise's device, so that
    no read waits for it (training_stats takes them as they are)."""
    x, n = _flat(images, noise)
    unit = x / x.norm(dim=1, keepdim=True).clamp(min=1e-12)
    return dict(noise_norm=n.norm(dim=1).mean() / x.shape[1] ** 0.5, noise_proj=(n * unit).sum(dim=1).mean())

def pairing_cost(images, noise, idx=None):
    """Summed Euclidean distance between images[i] and noise[idx[i]] in float64 (identity pairing
    when idx is None)."""
    if images.shape != noise.shape:
        raise ValueError(f'AOT images {list(images.shape)} and noise {list(noise.shape)} must have the same shape [N, ...]')
    if idx is not None:
        noise = noise[idx.to(noise.device)]
    return (images.detach().double() - noise.detach().double()).flatten(1).norm(dim=1).sum().item()

#----------------------------------------------------------------------------
