"""Moved: image files (uint8 conversion, grids, atomic PNG writes) are sampling/images.py. This
module keeps the old names importable."""

from sampling.images import make_grid, save_image_grid, save_png, to_uint8 # noqa: F401
