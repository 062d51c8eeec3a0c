"""Tiles of images at native resolution, and maps stitched back from them.

:func:`tile` cuts images (N, C, H, W) into tiles of ``tile_size`` at ``stride`` (overlap
allowed); :func:`untile` stitches per-tile maps back at the full image size, averaging
(or taking the maximum of) the overlaps. As anomalib's ``Tiler``
(``anomalib.data.utils.tiler``) with one difference: where ``stride`` does not divide
``H - tile_size``, anomalib pads the image (zeros) up to the next multiple, which puts
artificial borders into the last tiles; here the last row (column) of tiles is moved back
to end at the image border instead (:func:`tile_origins`), so that every tile is real
image and the tiles still cover every pixel.

Tiles are ordered image by image, and within an image row by row (row-major over the
grid of :func:`tile_origins`), so tile ``i`` comes from image ``i // n_tiles``.
Everything is slicing, padding and elementwise arithmetic: traceable by
``torch.jit.trace`` and the TorchScript-based ONNX exporter (the grid is fixed by the
traced image size).
"""

from __future__ import annotations

from numbers import Integral

import torch
import torch.nn.functional as F

__all__ = ["as_pair", "tile_origins", "tile_grid", "tile", "resize_tiles", "untile"]

_MERGES = ("mean", "max")


def as_pair(value, name: str) -> tuple[int, int]:
    """``(height, width)`` of an int or a pair of ints, each at least 1.

    Parameters
    ----------
    value : int or (int, int)
        A size in pixels.
    name : str
        Its name, for error messages.

    Returns
    -------
    pair : (int, int)

    Raises
    ------
    TypeError
        If ``value`` is neither an int nor a pair of ints.
    ValueError
        If a size is smaller than 1.

    Examples
    --------
    >>> as_pair(64, "tile_size"), as_pair((32, 48), "tile_size")
    ((64, 64), (32, 48))
    """
    if isinstance(value, Integral) and not isinstance(value, bool):
        pair = (int(value), int(value))
    elif (isinstance(value, (tuple, list)) and len(value) == 2
          and all(isinstance(v, Integral) and not isinstance(v, bool) for v in value)):
        pair = (int(value[0]), int(value[1]))
    else:
        raise TypeError(f"{name} must be an int or a pair of ints (height, width), got "
                        f"{value!r}")
    if min(pair) < 1:
        raise ValueError(f"{name} must be at least 1 pixel, got {value!r}")
    return pair


def tile_origins(length: int, tile_size: int, stride: int) -> list[int]:
    """Start offsets of the tiles along one axis of ``length`` pixels.

    ``0, stride, 2 * stride, ...`` while a tile fits, then one last tile ending at the
    border (``length - tile_size``) if the strided ones leave pixels uncovered.

    Parameters
    ----------
    length : int
        Image height or width in pixels.
    tile_size : int
        Tile extent along this axis, ``1 <= tile_size <= length``.
    stride : int
        Step between tiles, ``1 <= stride <= tile_size``.

    Returns
    -------
    origins : list of int
        Increasing; the first is 0 and the last ``length - tile_size``.

    Raises
    ------
    ValueError
        If ``tile_size`` exceeds ``length``, or ``stride`` exceeds ``tile_size`` (tiles
        would leave gaps), or a size is below 1.

    Examples
    --------
    >>> tile_origins(512, 256, 256)
    [0, 256]
    >>> tile_origins(500, 256, 128)  # the last tile aligned to the border
    [0, 128, 244]
    """
    length, tile_size, stride = int(length), int(tile_size), int(stride)
    if min(length, tile_size, stride) < 1:
        raise ValueError(f"sizes must be at least 1, got length={length}, "
                         f"tile_size={tile_size}, stride={stride}")
    if tile_size > length:
        raise ValueError(f"tile size {tile_size} is larger than the image ({length} "
                         "pixels): use a tile_size of at most the smallest image side")
    if stride > tile_size:
        raise ValueError(f"tile stride {stride} is larger than the tile size {tile_size}: "
                         "the tiles would leave pixels uncovered")
    origins = list(range(0, length - tile_size + 1, stride))
    if origins[-1] != length - tile_size:
        origins.append(length - tile_size)
    return origins


def tile_grid(image_size, tile_size, stride=None) -> list[tuple[int, int]]:
    """Top-left corners ``(row, col)`` of the tiles of one image, row-major.

    Parameters
    ----------
    image_size : int or (int, int)
        Image ``(height, width)``.
    tile_size : int or (int, int)
        Tile ``(height, width)``.
    stride : int, (int, int) or None, default=None
        Step between tiles; None: ``tile_size`` (no overlap).

    Returns
    -------
    corners : list of (int, int)
        One per tile: ``len(tile_origins(H, ...)) * len(tile_origins(W, ...))``.

    Raises
    ------
    ValueError
        As :func:`tile_origins`, naming the axis.

    Examples
    --------
    >>> tile_grid((300, 200), 128, 100)
    [(0, 0), (0, 72), (100, 0), (100, 72), (172, 0), (172, 72)]
    """
    size = as_pair(image_size, "image_size")
    tiles = as_pair(tile_size, "tile_size")
    steps = tiles if stride is None else as_pair(stride, "tile_stride")
    axes = []
    for axis, name in enumerate(("height", "width")):
        try:
            axes.append(tile_origins(size[axis], tiles[axis], steps[axis]))
        except ValueError as exc:
            raise ValueError(f"image {name} {size[axis]}: {exc}") from None
    return [(r, c) for r in axes[0] for c in axes[1]]


def tile(images: torch.Tensor, tile_size, stride=None) -> torch.Tensor:
    """Cut images into tiles: (N, C, H, W) -> (N * n_tiles, C, tile_h, tile_w).

    Parameters
    ----------
    images : torch.Tensor of shape (N, C, H, W)
        Any dtype and device (the tiles follow it); not modified.
    tile_size : int or (int, int)
        Tile ``(height, width)``, at most the image's.
    stride : int, (int, int) or None, default=None
        Step between tiles (at most ``tile_size``); None: ``tile_size``.

    Returns
    -------
    tiles : torch.Tensor of shape (N * n_tiles, C, tile_h, tile_w)
        A new tensor, image by image, row-major within an image (:func:`tile_grid`).

    Raises
    ------
    ValueError
        If ``images`` is not 4-D, or the sizes do not fit (:func:`tile_origins`).

    Examples
    --------
    >>> import torch
    >>> x = torch.arange(2 * 1 * 4 * 6.0).reshape(2, 1, 4, 6)
    >>> t = tile(x, (4, 4), 2)
    >>> t.shape
    torch.Size([4, 1, 4, 4])
    >>> bool((t[1] == x[0, :, :, 2:6]).all()), bool((t[3] == x[1, :, :, 2:6]).all())
    (True, True)
    """
    if images.dim() != 4:
        raise ValueError(f"images must be 4-D (N, C, H, W), got shape {tuple(images.shape)}")
    th, tw = as_pair(tile_size, "tile_size")
    grid = tile_grid(tuple(int(s) for s in images.shape[-2:]), (th, tw), stride)
    parts = [images[:, :, r:r + th, k:k + tw] for r, k in grid]
    # flatten, not reshape to sizes read from the input: a trace keeps N (and C) free
    return torch.stack(parts, dim=1).flatten(0, 1)


def resize_tiles(tiles: torch.Tensor, size) -> torch.Tensor:
    """Tiles resized to ``size`` before the backbone: bilinear, antialiased when shrinking.

    Enlarging a tile (``size`` above the tile's) is a zoom: the backbone's stride-8
    features then fall every ``8 * tile / size`` pixels of the image, finer than 8, so
    that defects of one or two pixels reach them. Shrinking is antialiased (as
    ``skanomaly fit`` resizes images); enlarging is plain bilinear interpolation
    (antialiasing does nothing there, and plain bilinear resizing exports to ONNX).

    Parameters
    ----------
    tiles : torch.Tensor of shape (n, C, h, w)
        Floating tiles (of :func:`tile`), any device; not modified.
    size : int or (int, int)
        Output ``(height, width)`` in pixels.

    Returns
    -------
    resized : torch.Tensor of shape (n, C, size_h, size_w)
        ``tiles`` itself when it already has that size, else a new tensor of its dtype
        and device (``torch.nn.functional.interpolate``, ``mode="bilinear"``,
        ``align_corners=False``; float16 and bfloat16 computed in float32).

    Raises
    ------
    ValueError
        If ``tiles`` is not 4-D and floating with at least one channel and pixel, or
        ``size`` is below 1.
    TypeError
        If ``size`` is neither an int nor a pair of ints.

    Examples
    --------
    >>> import torch
    >>> x = torch.arange(4.0).reshape(1, 1, 2, 2)
    >>> resize_tiles(x, 4)[0, 0, 0].tolist()  # each pixel's centre keeps its value
    [0.0, 0.25, 0.75, 1.0]
    >>> resize_tiles(torch.zeros(3, 3, 32, 48), (64, 96)).shape
    torch.Size([3, 3, 64, 96])
    """
    if tiles.dim() != 4 or not tiles.is_floating_point() or min(tiles.shape[1:]) == 0:
        raise ValueError(f"tiles must be floating (n, C, h, w) with C, h, w at least 1, got "
                         f"{tiles.dtype} of shape {tuple(tiles.shape)}")
    height, width = as_pair(size, "tile_resize")
    if (int(tiles.shape[-2]), int(tiles.shape[-1])) == (height, width):
        return tiles
    shrink = height < int(tiles.shape[-2]) or width < int(tiles.shape[-1])
    # 16-bit floats interpolate in float32 (CPU has no antialiased half kernels)
    work = tiles.float() if tiles.element_size() < 4 else tiles
    out = F.interpolate(work, size=(height, width), mode="bilinear", align_corners=False,
                        antialias=shrink)
    # each output is a convex combination of inputs, so it lies within their range; only
    # rounding can carry one past the dtype's largest value (inf): clamped back to it
    limit = torch.finfo(tiles.dtype).max
    return out.clamp_(-limit, limit).to(tiles.dtype)


def untile(tiles: torch.Tensor, image_size, stride=None, merge: str = "mean") -> torch.Tensor:
    """Stitch per-tile maps back into full-size maps (the inverse of :func:`tile`).

    Parameters
    ----------
    tiles : torch.Tensor of shape (N * n_tiles, tile_h, tile_w) or (N * n_tiles, C, tile_h, tile_w)
        Maps of the tiles of :func:`tile` (same order), at tile resolution; floating.
    image_size : int or (int, int)
        ``(H, W)`` of the images the tiles were cut from.
    stride : int, (int, int) or None, default=None
        The stride the tiles were cut with; None: the tile size.
    merge : {"mean", "max"}, default="mean"
        How overlapping pixels combine: the mean of the tiles covering the pixel
        (anomalib's ``Tiler.untile``), or their maximum.

    Returns
    -------
    maps : torch.Tensor of shape (N, H, W) or (N, C, H, W)
        Same dtype and device as ``tiles`` (the mean is summed in float64).

    Raises
    ------
    ValueError
        If ``merge`` is unknown, ``tiles`` is not 3-D or 4-D or floating, or its length
        is not a multiple of the number of tiles per image.

    Examples
    --------
    >>> import torch
    >>> x = torch.rand(2, 3, 10, 7, dtype=torch.float64)
    >>> bool(torch.equal(untile(tile(x, 4, 3), (10, 7), 3), x))  # the mean of equal values
    True
    >>> maps = torch.ones(4, 4, 4)
    >>> maps[1] = 3.0  # image 0's second tile, columns 2 to 5
    >>> untile(maps, (4, 6), 2)[0, 0].tolist()
    [1.0, 1.0, 2.0, 2.0, 3.0, 3.0]
    >>> untile(maps, (4, 6), 2, merge="max")[0, 0].tolist()
    [1.0, 1.0, 3.0, 3.0, 3.0, 3.0]
    """
    if merge not in _MERGES:
        raise ValueError(f"merge must be one of {_MERGES}, got {merge!r}")
    if tiles.dim() not in (3, 4) or not tiles.is_floating_point():
        raise ValueError(f"tiles must be floating maps (n, h, w) or (n, C, h, w), got "
                         f"{tiles.dtype} of shape {tuple(tiles.shape)}")
    height, width = as_pair(image_size, "image_size")
    th, tw = int(tiles.shape[-2]), int(tiles.shape[-1])
    grid = tile_grid((height, width), (th, tw), stride)
    if tiles.shape[0] % len(grid):
        raise ValueError(f"{tiles.shape[0]} tiles are not a whole number of images of "
                         f"{len(grid)} tiles each")
    per_image = tiles.reshape(-1, len(grid), *tiles.shape[1:])
    if merge == "mean":  # summed in float64: a sum of large float32 values stays finite
        per_image = per_image.to(torch.float64)
    fill = 0.0 if merge == "mean" else -torch.inf
    out = None
    for i, (r, k) in enumerate(grid):
        # the tile padded to the image: elementwise accumulation, no in-place writes
        placed = F.pad(per_image[:, i], (k, width - k - tw, r, height - r - th), value=fill)
        if out is None:
            out = placed
        elif merge == "mean":
            out = out + placed
        else:
            out = torch.maximum(out, placed)
    if merge == "mean":
        count = torch.zeros((height, width), dtype=torch.float64)
        for r, k in grid:
            count[r:r + th, k:k + tw] += 1
        out = (out / count.to(tiles.device)).to(tiles.dtype)
    return out
