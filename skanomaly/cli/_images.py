"""The command's input: image folders (read by :mod:`skanomaly.streaming`), MVTec-style
labels from the folder layout, and ground-truth masks.

Private to :mod:`skanomaly.cli`; the names here are public to the command's modules.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePath

import numpy as np

from ..streaming import IMAGE_SUFFIXES, find_images, read_image
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


@dataclass
class ImageSet:
    images: np.ndarray  # float32 (n, 3, s, s) in [0, 1]
    names: list[str]
    labels: np.ndarray  # int64 (n,): +1 good, -1 defective, 0 unknown
    defect_types: list[str]  # "" where unknown
    masks: np.ndarray | None  # bool (n, s, s), or None when no masks are known


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


def read_images(paths, size: int, quiet: bool, desc: str):
    """Stack of images (n, 3, size, size) float32 and their original sizes."""
    images = np.empty((len(paths), 3, size, size), dtype=np.float32)
    originals = []
    for i, path in enumerate(progress(paths, quiet, desc=desc, unit="image")):
        images[i], original = read_image(path, size, return_size=True)
        originals.append(original)
    return images, originals


def find_mask(mask_dir: Path, relative: Path) -> Path | None:
    """MVTec-style mask of the test image at ``relative``, or None when there is none."""
    folder = mask_dir / relative.parent
    for stem in (f"{relative.stem}_mask", relative.stem):
        for suffix in IMAGE_SUFFIXES:
            candidate = folder / f"{stem}{suffix}"
            if candidate.is_file():
                return candidate
    return None


def read_mask(path: Path, image_path: Path, image_size: tuple[int, int], size: int):
    """Mask at ``path`` as bool (size, size); CLIError if its size differs from the image."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()
            if img.size != image_size:
                raise CLIError(
                    f"mask {path} is {img.size[0]}x{img.size[1]} pixels but its image "
                    f"{image_path} is {image_size[0]}x{image_size[1]}"
                )
            mask = np.asarray(img.convert("L").resize((size, size), Image.NEAREST)) > 0
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise CLIError(f"cannot read mask {path}: {exc}") from exc
    return mask


class LazyImages:
    """The images at ``paths``, read on indexing (for heatmaps: none kept in memory)."""

    def __init__(self, paths, size):
        self.paths, self.size = paths, size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return read_image(self.paths[i], self.size)
