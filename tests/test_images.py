"""sampling/images.py: EDM's uint8 rounding and grid tiling."""

import numpy as np
import torch

from sampling.images import make_grid, to_uint8

def test_to_uint8_rounds_like_edm():
    x = torch.tensor([-1.0, -0.999, 0.0, 0.5, 1.0, 2.0]).reshape(1, 1, 1, 6)
    assert to_uint8(x).reshape(-1).tolist() == [0, 0, 128, 191, 255, 255]

def test_grid_scale_and_gap():
    images = np.arange(3 * 2 * 2, dtype=np.uint8).reshape(3, 2, 2, 1) + 1
    grid = make_grid(images, scale=2, gap=1) # 2 x 2 tiles of 4 x 4 pixels, 1-pixel gray lines
    assert grid.shape == (9, 9, 1)
    assert (grid[4, :] == 128).all() and (grid[:, 4] == 128).all()
    assert (grid[0:2, 0:2] == images[0, 0, 0]).all() and (grid[5:7, 2:4] == images[2, 0, 1]).all()
    assert (grid[5:, 5:] == 128).all() # the empty cell
    assert make_grid(images, cols=3).shape == (2, 6, 1)
