"""Seeds: lists of them, and their latents and class labels, drawn as EDM's generate.py draws
them (one torch.Generator per seed), so that a seed names the same image here, in EDM, at any batch
size and on any number of processes."""

import torch

import dnnlib

MAX_SEEDS = 10_000_000 # per run of generate.py: 200 full FID sets of 50,000; more is better split into runs (the seed list lives in memory on every rank)
SEED_LIMIT = 1 << 32   # seeds are torch.Generator seeds modulo 2^32 (as in EDM): a larger one would repeat a smaller one's image

def parse_seeds(text):
    """'0-49999,100,5-7' -> [0, ..., 49999, 100, 5, 6, 7]. Raises ValueError naming the bad part.
    The count is checked before any list is built, so a huge range is an error, not a MemoryError."""
    ranges = dnnlib.util.parse_ranges(text, 'seed')
    count = sum(len(r) for r in ranges)
    if count > MAX_SEEDS:
        raise ValueError(f'{count:,} seeds, more than the {MAX_SEEDS:,} one run takes; split them into several runs into the same folder')
    top = max(r[-1] for r in ranges)
    if top >= SEED_LIMIT:
        raise ValueError(f'seed {top} is above {SEED_LIMIT - 1}: seeds are used modulo 2^32, so it would repeat the image of seed {top % SEED_LIMIT}')
    seeds = [seed for r in ranges for seed in r]
    repeated = len(seeds) - len(set(seeds))
    if repeated:
        raise ValueError(f'{repeated} seed(s) appear more than once; each seed names one image')
    return seeds

class StackedRandomGenerator:
    """One torch.Generator per seed, so sample i of a batch depends only on seeds[i]."""

    def __init__(self, device, seeds):
        self.generators = [torch.Generator(device).manual_seed(int(seed) % (1 << 32)) for seed in seeds]

    def randn(self, size, **kwargs):
        assert size[0] == len(self.generators)
        return torch.stack([torch.randn(size[1:], generator=gen, **kwargs) for gen in self.generators])

    def randn_like(self, input):
        return self.randn(input.shape, dtype=input.dtype, layout=input.layout, device=input.device)

    def randint(self, *args, size, **kwargs):
        assert size[0] == len(self.generators)
        return torch.stack([torch.randint(*args, size=size[1:], generator=gen, **kwargs) for gen in self.generators])

def latents_for_seeds(net, seeds, device='cpu', class_idx=None):
    """Latents and one-hot class labels for a batch of seeds, drawn as EDM's generate.py does:
    latents first, then a random label from the same generators (drawn even when class_idx forces
    the label, so the stochastic sampler's noise stream stays the same). Returns (latents,
    class_labels or None, rnd); pass randn_like=rnd.randn_like to the sampler."""
    if class_idx is not None and not (0 <= class_idx < net.label_dim):
        raise ValueError(f'class {class_idx} is out of range: the network has {net.label_dim} classes'
                         if net.label_dim else f'class {class_idx} given, but the network is unconditional')
    device = torch.device(device)
    rnd = StackedRandomGenerator(device, seeds)
    latents = rnd.randn([len(seeds), net.img_channels, net.img_resolution, net.img_resolution], device=device)
    class_labels = None
    if net.label_dim:
        class_labels = torch.eye(net.label_dim, device=device)[rnd.randint(net.label_dim, size=[len(seeds)], device=device)]
        if class_idx is not None:
            class_labels[:, :] = 0
            class_labels[:, class_idx] = 1
    return latents, class_labels, rnd
