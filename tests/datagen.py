"""Small synthetic datasets in EDM's archive format for tests."""

import json
import os

import numpy as np
import PIL.Image

def make_dataset(path, n=40, res=8, channels=3, num_classes=4, labels=True):
    """A folder of n random res x res PNGs, with dataset.json labels i % num_classes if labels."""
    os.makedirs(path, exist_ok=True)
    rng = np.random.RandomState(0)
    entries = []
    for i in range(n):
        img = rng.randint(0, 256, size=[res, res, channels], dtype=np.uint8)
        name = f'img{i:04d}.png'
        PIL.Image.fromarray(img[:, :, 0] if channels == 1 else img).save(os.path.join(path, name))
        entries.append([name, i % num_classes])
    if labels:
        with open(os.path.join(path, 'dataset.json'), 'w') as f:
            json.dump({'labels': entries}, f)
    return str(path)
