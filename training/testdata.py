"""Small stand-ins for data that cannot be had offline, for the tests and the benchmarks: synthetic
datasets in EDM's archive format, and the golden test networks of tests/golden/networks (weights
made with the reference implementation, loaded strictly)."""

import json
import os

import numpy as np
import PIL.Image
import torch

GOLDEN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'tests', 'golden')

def make_dataset(path, n=40, res=8, channels=3, num_classes=4, labels=True, structured=False):
    """A folder of n random res x res PNGs, with dataset.json labels i % num_classes if labels.
    structured: each image is its class's fixed pattern plus a little noise, something a network
    can learn in a few steps (independent random pixels are already denoised best by EDM's skip)."""
    os.makedirs(path, exist_ok=True)
    rng = np.random.RandomState(0)
    patterns = np.random.RandomState(1).randint(0, 256, size=[num_classes, res, res, channels]) # own stream: plain datasets stay as they were
    entries = []
    for i in range(n):
        img = rng.randint(0, 256, size=[res, res, channels], dtype=np.uint8)
        if structured:
            img = np.clip(patterns[i % num_classes] + (img.astype(int) - 128) // 8, 0, 255).astype(np.uint8)
        name = f'img{i:04d}.png'
        PIL.Image.fromarray(img[:, :, 0] if channels == 1 else img).save(os.path.join(path, name))
        entries.append([name, i % num_classes])
    if labels:
        with open(os.path.join(path, 'dataset.json'), 'w') as f:
            json.dump({'labels': entries}, f)
    return str(path)

def load_golden_network(npz_path, json_path):
    """A golden network (paths relative to tests/golden), in eval mode without gradients."""
    from training import networks
    meta = json.load(open(os.path.join(GOLDEN, json_path)))
    data = np.load(os.path.join(GOLDEN, npz_path), allow_pickle=False)
    net = getattr(networks, meta['precond_class'])(**meta['constructor_kwargs'])
    net.load_state_dict({k[len('state/'):]: torch.from_numpy(data[k]) for k in data.files if k.startswith('state/')}, strict=True)
    return net.eval().requires_grad_(False)
