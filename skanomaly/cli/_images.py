"""The command's input: image folders (read by :mod:`skanomaly.streaming`), MVTec-style
labels from the folder layout, and ground-truth masks.

Private to :mod:`skanomaly.cli`; the names here are public to the command's modules.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePath

import numpy as np

from ..streaming import IMAGE_SUFFIXES, find_images, read_image, target_size
from ._common import CLIError, progress


def test_label(relative_path) -> tuple[int, str]:
    """Label and defect type of a test image from its path in an MVTec-style test folder.

    Parameters
    ----------
    relative_path : str or os.PathLike
        Path of the image relative to the test folder.

    Returns
    -------
    label : int
        ``+1`` under ``good/``, ``-1`` under any other top-level subfolder, ``0``
        (unknown) for an image directly in the test folder.
    defect_type : str
        The top-level subfolder's name (``"good"`` for normal images), ``""`` if unknown.

    Examples
    --------
    >>> from skanomaly.cli import test_label
    >>> test_label("good/000.png"), test_label("crack/a/001.png"), test_label("x.png")
    ((1, 'good'), (-1, 'crack'), (0, ''))
    """
    parts = PurePath(relative_path).parts
    if len(parts) < 2:
        return 0, ""
    return (1 if parts[0] == "good" else -1), parts[0]


test_label.__test__ = False  # a helper named test_*, not a pytest test


#: The long side of a resized image is --image-size plus a multiple of this many pixels
#: (:func:`skanomaly.streaming.target_size`): the stride of the spatial detectors' deepest
#: default layers, so that images of nearly one aspect ratio share one size and one
#: feature grid, and a square image stays --image-size square.
LONG_SIDE_STEP = 16

#: The command's rule for image sizes, as --help and the errors state it.
SIZE_RULE = (
    "each image is resized (bilinear) so that its short side is --image-size pixels and "
    f"its long side keeps the aspect ratio, rounded to --image-size plus a multiple of "
    f"{LONG_SIDE_STEP} pixels (a square image becomes --image-size square)"
)


@dataclass
class ImageSet:
    images: object  # (n, 3, h, w) float32 in [0, 1], or a LazyImages at native size
    names: list[str]
    labels: np.ndarray  # int64 (n,): +1 good, -1 defective, 0 unknown
    defect_types: list[str]  # "" where unknown
    masks: object  # bool (n, h, w) or a list of (h_i, w_i) at the maps' sizes, or None
    sizes: list | None = None  # each image's (width, height) in its file; None: the maps'
    # the images as the model reads them, when ``images`` holds them at native size:
    # (n, 3, h, w) float32, or a list of (3, h_i, w_i) when sizes differ (tiled models)
    model_images: object = None


def px(size) -> str:
    """(height, width) as "WxH px", as image viewers name sizes."""
    return f"{size[1]}x{size[0]} px"


class Resize:
    """How the command reads an image: the short side to ``image_size`` with the aspect
    ratio kept (``keep_aspect``; model files before it resized to a square)."""

    def __init__(self, image_size: int, keep_aspect: bool = True):
        self.image_size, self.keep_aspect = int(image_size), keep_aspect

    def size(self, original) -> tuple[int, int]:
        """(height, width) an image of ``original`` (width, height) is read at."""
        return target_size(original, self.image_size, self.keep_aspect, LONG_SIDE_STEP)

    def read(self, path):
        """The image, float32 (3, h, w), and its (width, height) in the file."""
        return read_image(path, self.image_size, keep_aspect=self.keep_aspect,
                          long_side_step=LONG_SIDE_STEP, return_size=True)


def file_size(path) -> tuple[int, int]:
    """(width, height) of an image file, from its header; CLIError naming the file."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.size
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise CLIError(f"cannot read image {path}: {exc}") from exc


def _listed(items, most: int = 3) -> str:
    shown = ", ".join(items[:most])
    return shown + (f" and {len(items) - most} more" if len(items) > most else "")


def one_size(paths, resize: Resize, what: str, root=None) -> tuple[int, int]:
    """The one (height, width) that the images at ``paths`` are read at; a CLIError that
    names the files of other sizes when they differ (a detector fits one feature grid)."""
    originals = [file_size(p) for p in paths]
    sizes = [resize.size(o) for o in originals]
    common = Counter(sizes).most_common(1)[0][0]
    odd = [i for i, size in enumerate(sizes) if size != common]
    if odd:
        def name(i):
            return (paths[i] if root is None else paths[i].relative_to(root)).as_posix()

        first = sizes.index(common)
        others = [f"{name(i)} ({originals[i][0]}x{originals[i][1]} px -> {px(sizes[i])})"
                  for i in odd]
        raise CLIError(
            f"the images of {what} must have one size after resizing ({SIZE_RULE}), as "
            f"a detector is fitted on one feature grid: {len(paths) - len(odd)} of them "
            f"come out at {px(common)} (e.g. {name(first)}, {originals[first][0]}x"
            f"{originals[first][1]} px), but {len(odd)} do not: {_listed(others)}; crop "
            "or pad them to one aspect ratio, or fit one model per shape"
        )
    return common


def check_size(path, original, size, fitted, resize: Resize, hint: str) -> None:
    """CLIError unless the image at ``path`` is read at the ``fitted`` size."""
    if size != fitted:
        raise CLIError(
            f"image {path} ({original[0]}x{original[1]} px) comes out at {px(size)} after "
            f"resizing to a short side of {resize.image_size} px, but the model was "
            f"fitted on {px(fitted)} images, and without tiling a detector scores only "
            f"the size it was fitted on: {hint}"
        )


def read_stack(paths, resize: Resize, quiet: bool, desc: str, size=None):
    """The images at ``paths`` stacked (n, 3, h, w) float32 (``size`` is their (h, w),
    from :func:`one_size`) and their sizes in the files."""
    size = size or resize.size(file_size(paths[0]))
    images = np.empty((len(paths), 3, *size), dtype=np.float32)
    originals = []
    for i, path in enumerate(progress(paths, quiet, desc=desc, unit="image")):
        images[i], original = resize.read(path)
        originals.append(original)
    return images, originals


def size_runs(shapes, batch_size: int) -> list[tuple[int, int]]:
    """(start, stop) of batches of at most ``batch_size`` consecutive items of one shape."""
    runs, start = [], 0
    for i in range(1, len(shapes) + 1):
        if i == len(shapes) or shapes[i] != shapes[start] or i - start == batch_size:
            runs.append((start, i))
            start = i
    return runs


def find_images_in(directory: Path, what: str) -> list[Path]:
    """:func:`skanomaly.streaming.find_images`, with its errors as CLIError naming the
    option (``what``) that gave the folder."""
    try:
        return find_images(directory)
    except (FileNotFoundError, NotADirectoryError):
        raise CLIError(f"{what} {directory} is not a directory") from None
    except ValueError:
        raise CLIError(
            f"no images found in {what} {directory} (looked recursively for "
            f"{', '.join(IMAGE_SUFFIXES)} files)"
        ) from None


def find_mask(mask_dir: Path, relative: Path) -> Path | None:
    """MVTec-style mask of the test image at ``relative``, or None when there is none."""
    folder = mask_dir / relative.parent
    for stem in (f"{relative.stem}_mask", relative.stem):
        for suffix in IMAGE_SUFFIXES:
            candidate = folder / f"{stem}{suffix}"
            if candidate.is_file():
                return candidate
    return None


def read_mask(path: Path, image_path: Path, image_size: tuple[int, int], size):
    """Mask at ``path`` as bool at ``size`` (height, width), resized as the map of its
    image (nearest neighbour); CLIError if it is not the size of its image
    (``image_size``, width and height)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()
            if img.size != tuple(image_size):
                raise CLIError(
                    f"mask {path} is {img.size[0]}x{img.size[1]} pixels but its image "
                    f"{image_path} is {image_size[0]}x{image_size[1]}"
                )
            mask = np.asarray(img.convert("L").resize((size[1], size[0]), Image.NEAREST)) > 0
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise CLIError(f"cannot read mask {path}: {exc}") from exc
    return mask


class LazyImages:
    """The images at ``paths`` at their native size, read on indexing (for heatmaps: none
    kept in memory)."""

    def __init__(self, paths):
        self.paths = paths

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return read_image(self.paths[i], None)
