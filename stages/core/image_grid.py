"""Images side by side in one picture: the report's sample grids and the trackers' snapshots."""

import numpy as np


def tile(images, pad=1):
    """[n, C, H, W] uint8 -> one [rows * (H + pad) + pad, cols * (W + pad) + pad, C] image, grey between."""
    n, c, h, w = images.shape
    side = int(np.ceil(np.sqrt(n)))
    grid = np.full((side * (h + pad) + pad, side * (w + pad) + pad, c), 128, np.uint8)
    for k, img in enumerate(images):
        r, q = divmod(k, side)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = \
            img.transpose(1, 2, 0)
    return grid
