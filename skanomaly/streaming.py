"""Fit a pipeline on a folder of images batch by batch: memory flat in the number of images.

:func:`partial_fit_images` reads a batch of images, runs it through the pipeline's
transformers (a :class:`~skanomaly.features.FeatureExtractor`, ...) and hands the features
to the detector's ``partial_fit``, then reads the next batch: only one batch of images and
one of features are in memory at a time, besides the detector's own state (which is
bounded: moments for PaDiM, Gaussian and DFM, a reservoir for DFKDE, a memory bank of at
most ``max_bank_size`` entries for PatchCore). :func:`iter_image_batches` is the reader,
:func:`find_images` and :func:`read_image` its parts. The ``skanomaly fit`` command is
built on them.

Images are read with Pillow (PNG, JPEG, BMP, TIFF, WebP), converted to RGB (16-bit grey
scaled by 1/65535) and, by ``image_size``, resized with bilinear interpolation to
``image_size`` x ``image_size`` pixels (an int: the aspect ratio is ignored, as anomalib
does), to ``(height, width)`` (a pair), or to a short side of ``image_size`` pixels with
the aspect ratio kept (``keep_aspect=True``; ``long_side_step`` rounds the long side to
the short side plus a multiple of that many pixels), or read at their native resolution
(``None``; for a tiled :class:`~skanomaly.AnomalyPipeline`). Where sizes may differ, a
folder is read by one rule: a batch holds consecutive images (in file order) of one
size, and a change of size starts a new batch.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from collections.abc import Iterable, Iterator
from numbers import Integral
from pathlib import Path

import numpy as np

__all__ = [
    "IMAGE_SUFFIXES",
    "ImageReadError",
    "find_images",
    "read_image",
    "target_size",
    "iter_image_batches",
    "partial_fit_images",
]

#: File suffixes read as images (lower case; matched case-insensitively).
IMAGE_SUFFIXES = (".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")


class ImageReadError(ValueError):
    """An image file that cannot be read (missing, truncated, not an image)."""


def _check_int(value, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be at least {low}, got {value}")
    return int(value)


def _image_paths(folder: Path) -> list[Path]:
    """Image files under ``folder``, recursively, sorted, hidden files left out."""
    return sorted(
        p for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and not p.name.startswith(".")
    )


def find_images(folder) -> list[Path]:
    """Image files under a folder, searched recursively, in sorted order.

    Parameters
    ----------
    folder : str or os.PathLike
        The folder. Files whose suffix is in :data:`IMAGE_SUFFIXES` (any case) count;
        hidden files (names starting with ``.``) do not.

    Returns
    -------
    paths : list of pathlib.Path
        Sorted by path, so the order is the same on every platform and run.

    Raises
    ------
    TypeError
        If ``folder`` is not a str or path-like.
    FileNotFoundError
        If ``folder`` does not exist.
    NotADirectoryError
        If it is not a directory.
    ValueError
        If it holds no image.

    Examples
    --------
    >>> import tempfile
    >>> from pathlib import Path
    >>> from PIL import Image
    >>> from skanomaly.streaming import find_images
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     (Path(tmp) / "sub").mkdir()
    ...     Image.new("RGB", (8, 8)).save(Path(tmp) / "sub" / "b.png")
    ...     Image.new("L", (8, 8)).save(Path(tmp) / "a.JPG")
    ...     (Path(tmp) / "notes.txt").write_text("not an image")
    ...     [p.relative_to(tmp).as_posix() for p in find_images(tmp)]
    12
    ['a.JPG', 'sub/b.png']
    """
    if not isinstance(folder, (str, os.PathLike)):
        raise TypeError(f"folder must be a str or path-like, got {type(folder).__name__}")
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"folder {folder} does not exist")
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder} is not a directory")
    paths = _image_paths(folder)
    if not paths:
        raise ValueError(f"no images found in {folder} (looked recursively for "
                         f"{', '.join(IMAGE_SUFFIXES)} files)")
    return paths


def _check_image_size(image_size, keep_aspect: bool = False):
    """``image_size`` checked: an int >= 1, a (height, width) pair of them, or None."""
    if image_size is None:
        return None
    if isinstance(image_size, (tuple, list)):
        if keep_aspect:
            raise ValueError("keep_aspect=True takes an int image_size (the short side), "
                             f"got {image_size!r}")
        if len(image_size) != 2:
            raise ValueError(f"image_size must be an int, a (height, width) pair or None, "
                             f"got {image_size!r}")
        return tuple(_check_int(v, "image_size", 1) for v in image_size)
    return _check_int(image_size, "image_size", 1)


def target_size(original, image_size, keep_aspect: bool = False,
                long_side_step: int = 1) -> tuple[int, int]:
    """The (height, width) an image of ``original`` (width, height) is read at.

    Parameters
    ----------
    original : (int, int)
        The image's (width, height) in pixels, as Pillow's ``Image.size``.
    image_size : int, (int, int) or None
        An int: a square of that side (or, with ``keep_aspect``, the short side); a
        (height, width) pair: that size; None: the original size.
    keep_aspect : bool, default=False
        Resize the short side to ``image_size`` and the long side in proportion.
    long_side_step : int >= 1, default=1
        With ``keep_aspect``: the long side is ``image_size`` plus a multiple of this
        many pixels, the multiple nearest to the proportional length (ties to even, as
        Python's ``round``). 1 rounds the long side to whole pixels; a larger step gives
        images of nearly the same aspect ratio one size (``skanomaly``'s command line
        uses 16), and a square image stays ``image_size`` square whatever the step.
        Ignored without ``keep_aspect``.

    Returns
    -------
    size : (int, int)
        (height, width) in pixels.

    Raises
    ------
    TypeError, ValueError
        If ``long_side_step`` is not an int >= 1.

    Examples
    --------
    >>> from skanomaly.streaming import target_size
    >>> target_size((640, 480), 128), target_size((640, 480), 128, keep_aspect=True)
    ((128, 128), (128, 171))
    >>> target_size((640, 480), None), target_size((640, 480), (60, 80))
    ((480, 640), (60, 80))

    A 16:9 image with a short side of 192 px: 341.3 px long, 192 + 9 x 16 = 336 with a
    step of 16; portrait images give (height, width) the other way round:

    >>> target_size((1920, 1080), 192, keep_aspect=True, long_side_step=16)
    (192, 336)
    >>> target_size((1080, 1920), 192, keep_aspect=True, long_side_step=16)
    (336, 192)
    >>> target_size((1000, 990), 192, keep_aspect=True, long_side_step=16)  # 193.9 px
    (192, 192)
    """
    step = _check_int(long_side_step, "long_side_step", 1)
    width, height = (int(v) for v in original)
    if image_size is None:
        return height, width
    if isinstance(image_size, tuple):
        return image_size
    if not keep_aspect:
        return image_size, image_size
    short, long = min(height, width), max(height, width)
    long_side = image_size + step * round((long * image_size / short - image_size) / step)
    long_side = max(1, long_side)
    return (image_size, long_side) if height <= width else (long_side, image_size)


def _read_image(path, image_size, keep_aspect: bool = False, long_side_step: int = 1
                ) -> tuple[np.ndarray, tuple[int, int]]:
    """The image as float32 (3, h, w) in [0, 1] (:func:`target_size`) and its original
    (width, height)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()
            original = img.size
            height, width = target_size(original, image_size, keep_aspect, long_side_step)
            resize = (width, height) != tuple(original)
            if img.mode in ("I", "F") or img.mode.startswith("I;16"):
                scale = 1.0 if img.mode == "F" else 1 / 65535
                grey = np.clip(np.asarray(img, dtype=np.float32) * scale, 0, 1)
                grey = Image.fromarray(grey, mode="F")
                if resize:
                    grey = grey.resize((width, height), Image.BILINEAR)
                array = np.repeat(np.asarray(grey, dtype=np.float32)[None], 3, axis=0)
            else:
                rgb = img.convert("RGB")
                if resize:
                    rgb = rgb.resize((width, height), Image.BILINEAR)
                array = np.asarray(rgb, dtype=np.float32).transpose(2, 0, 1) / 255
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageReadError(f"cannot read image {path}: {exc}") from exc
    # C-contiguous: a channels-last layout would change the backbone's float32 rounding
    return np.ascontiguousarray(np.clip(array, 0, 1)), original


def read_image(path, image_size, *, keep_aspect: bool = False, long_side_step: int = 1,
               return_size: bool = False):
    """One image file as a float32 RGB array in [0, 1], resized (or not).

    Parameters
    ----------
    path : str or os.PathLike
        An image file Pillow reads (PNG, JPEG, BMP, TIFF, WebP, ...).
    image_size : int >= 1, (int, int) or None
        An int: the image is resized to ``image_size`` x ``image_size`` with bilinear
        interpolation, ignoring its aspect ratio (or, with ``keep_aspect``, its short
        side to ``image_size``); a (height, width) pair: to that size; None: read at
        its native resolution (see :func:`target_size`).
    keep_aspect : bool, default=False
        Keep the aspect ratio: ``image_size`` is the short side.
    long_side_step : int >= 1, default=1
        With ``keep_aspect``: the long side is ``image_size`` plus the nearest multiple
        of this many pixels to its proportional length (see :func:`target_size`).
    return_size : bool, default=False
        Whether to return the size of the file's image too (e.g. to check that a
        mask has the size of its image).

    Returns
    -------
    image : ndarray of shape (3, height, width), float32
        Channels first, values in [0, 1]: 8-bit values divided by 255, 16-bit grey by
        65535, grey and palette images converted to RGB (grey replicated).
    size : tuple of (int, int)
        Only with ``return_size=True``: the image's (width, height) in the file, in
        pixels, before resizing.

    Raises
    ------
    ImageReadError
        A :class:`ValueError` naming the file, if it is missing or cannot be decoded.
    TypeError, ValueError
        If ``image_size`` is not an int >= 1, a pair of them or None, or
        ``long_side_step`` not an int >= 1.

    Examples
    --------
    >>> import tempfile
    >>> from pathlib import Path
    >>> import numpy as np
    >>> from PIL import Image
    >>> from skanomaly.streaming import read_image
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     Image.new("L", (40, 30), color=255).save(Path(tmp) / "white.png")
    ...     image = read_image(Path(tmp) / "white.png", 16)
    ...     wide = read_image(Path(tmp) / "white.png", 16, keep_aspect=True)
    ...     native = read_image(Path(tmp) / "white.png", None)
    >>> image.shape, image.dtype, float(image.min())
    ((3, 16, 16), dtype('float32'), 1.0)
    >>> wide.shape, native.shape  # a 40 x 30 image: short side 16; native
    ((3, 16, 21), (3, 30, 40))
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     Image.new("RGB", (40, 30)).save(Path(tmp) / "black.png")
    ...     image, size = read_image(Path(tmp) / "black.png", 16, return_size=True)
    >>> image.shape, size
    ((3, 16, 16), (40, 30))

    A 1000 x 600 image (width x height) with a short side of 96 px: 160 px long, kept
    by a step of 16; the image is Pillow's bilinear resize to 160 x 96:

    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     Image.new("RGB", (1000, 600), color=(255, 0, 0)).save(Path(tmp) / "red.png")
    ...     red = read_image(Path(tmp) / "red.png", 96, keep_aspect=True, long_side_step=16)
    >>> red.shape, red[:, 0, 0].tolist()
    ((3, 96, 160), [1.0, 0.0, 0.0])
    """
    _check_int(long_side_step, "long_side_step", 1)
    image, size = _read_image(path, _check_image_size(image_size, keep_aspect), keep_aspect,
                              long_side_step)
    return (image, size) if return_size else image


def _image_source(source) -> list[Path] | None:
    """The image paths of a folder or a sequence of paths; None for anything else."""
    if isinstance(source, (str, os.PathLike)):
        return find_images(source)
    if isinstance(source, (list, tuple)) and source and all(
            isinstance(p, (str, os.PathLike)) for p in source):
        return [Path(p) for p in source]
    return None


def iter_image_batches(source, batch_size: int = 32, image_size=128, *,
                       keep_aspect: bool = False, long_side_step: int = 1
                       ) -> Iterator[np.ndarray]:
    """Read images in batches: a generator of float32 arrays (n, 3, s, s).

    The images are split into ``ceil(n_images / batch_size)`` batches of sizes that
    differ by at most one (so no batch is much smaller than the others, and the last
    one is never a lone image when there are more), and read one batch at a time with
    :func:`read_image`: only one batch is in memory at once.

    Parameters
    ----------
    source : str, os.PathLike or sequence of them
        A folder (searched recursively by :func:`find_images`) or image file paths.
    batch_size : int >= 1, default=32
        Most images per batch.
    image_size : int >= 1, (int, int) or None, default=128
        Side of the square images in pixels, or as :func:`read_image` takes it.
    keep_aspect : bool, default=False
        Resize the short side to ``image_size`` (see :func:`read_image`).
    long_side_step : int >= 1, default=1
        With ``keep_aspect``: the step of the long side (see :func:`target_size`).

    Yields
    ------
    images : ndarray of shape (n, 3, height, width), float32
        The next batch, in [0, 1], in the order of :func:`find_images` (or of the
        paths given). Where the images' sizes may differ (``image_size=None`` or
        ``keep_aspect``), a batch holds consecutive images of one size (at most
        ``batch_size``): a change of size starts a new batch.

    Raises
    ------
    TypeError
        If ``source`` is neither a folder nor a non-empty sequence of paths, or the
        sizes are not ints.
    ValueError
        From :func:`find_images` (no images) and :func:`read_image`
        (:class:`ImageReadError`), raised when the batch holding the file is read.

    Examples
    --------
    >>> import tempfile
    >>> from pathlib import Path
    >>> from PIL import Image
    >>> from skanomaly.streaming import iter_image_batches
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     for i in range(10):
    ...         Image.new("RGB", (20, 20), color=(i, i, i)).save(Path(tmp) / f"{i}.png")
    ...     [batch.shape for batch in iter_image_batches(tmp, batch_size=4, image_size=8)]
    [(4, 3, 8, 8), (3, 3, 8, 8), (3, 3, 8, 8)]
    """
    batch_size = _check_int(batch_size, "batch_size", 1)
    image_size = _check_image_size(image_size, keep_aspect)
    _check_int(long_side_step, "long_side_step", 1)
    paths = _image_source(source)
    if paths is None:
        raise TypeError("source must be a folder or a non-empty sequence of image paths, "
                        f"got {type(source).__name__}")
    return _batches(paths, batch_size, image_size, keep_aspect, long_side_step)


def _batches(paths: list[Path], batch_size: int, image_size, keep_aspect: bool = False,
             long_side_step: int = 1) -> Iterator[np.ndarray]:
    if image_size is None or keep_aspect:  # sizes may differ: one size per batch
        yield from _batches_by_size(paths, batch_size, image_size, keep_aspect,
                                    long_side_step)
        return
    if isinstance(image_size, Integral):
        image_size = (image_size, image_size)
    n_batches = math.ceil(len(paths) / batch_size)
    for chunk in np.array_split(np.arange(len(paths)), n_batches):
        images = np.empty((len(chunk), 3, *image_size), dtype=np.float32)
        for row, i in enumerate(chunk):
            images[row] = _read_image(paths[i], image_size)[0]
        yield images


def _batches_by_size(paths, batch_size: int, image_size, keep_aspect: bool,
                     long_side_step: int = 1):
    pending = []
    for path in paths:
        image = _read_image(path, image_size, keep_aspect, long_side_step)[0]
        if pending and (image.shape != pending[0].shape or len(pending) == batch_size):
            yield np.stack(pending)
            pending = []
        pending.append(image)
    if pending:
        yield np.stack(pending)


def _array_batches(X, batch_size: int) -> Iterator[np.ndarray]:
    n_batches = math.ceil(len(X) / batch_size)
    for chunk in np.array_split(np.arange(len(X)), n_batches):
        yield X[chunk[0]:chunk[-1] + 1]


def _is_fitted(estimator) -> bool:
    from sklearn.exceptions import NotFittedError
    from sklearn.utils.validation import check_is_fitted

    try:
        check_is_fitted(estimator)
    except NotFittedError:
        return False
    return True


def partial_fit_images(pipeline, source, *, batch_size: int = 32, image_size=128,
                       keep_aspect: bool = False, long_side_step: int = 1,
                       verbose: bool = False):
    """Fit a pipeline ending in a skanomaly detector on images, one batch at a time.

    For each batch of images: the pipeline's transformers (e.g. a
    :class:`~skanomaly.features.FeatureExtractor`) transform it and the detector's
    ``partial_fit`` absorbs the result. Transformers not fitted yet are fitted on the
    first batch; they must learn nothing that later batches would change (a
    ``FeatureExtractor`` learns nothing from data; nor does a
    :class:`~sklearn.preprocessing.FunctionTransformer`). Peak memory is one batch of
    images and its features plus the detector's state, however many images there are
    (see the detectors' ``partial_fit`` for what they keep).

    After any split into batches the detector equals its ``fit`` on all the features
    up to float64 rounding for PaDiM, Gaussian and DFM; PatchCore's bank is a
    merge-and-reduce coreset and DFKDE's points a seeded reservoir (see their
    ``partial_fit``). ``offset_`` is the detector's streamed threshold
    (``calibration_``: leave-one-out scores of the last batch for PaDiM and the
    Gaussian, ``"score-then-update"`` for the others): call
    :func:`skanomaly.calibrate` with held-out normal images afterwards to set it from
    those instead.

    Parameters
    ----------
    pipeline : sklearn.pipeline.Pipeline
        Transformers, then a skanomaly detector (any of the five: all have
        ``partial_fit``). Modified in place. A fitted detector is updated, not
        restarted (``partial_fit`` semantics); pass a fresh or cloned pipeline to
        start over.
    source : str, os.PathLike, sequence of paths, array-like or iterable of arrays
        A folder of images (searched recursively by :func:`find_images`) or image
        paths, read by :func:`iter_image_batches`; or images in memory, (n, C, H, W),
        split into batches of ``batch_size``; or any iterable of such batches (a
        generator streams them from anywhere).
    batch_size : int >= 1, default=32
        Most images per batch, for folders, paths and arrays. The first batch must
        hold at least the detector's minimum number of samples (2 for PaDiM, DFM,
        DFKDE and the Gaussian).
    image_size : int >= 1, (int, int) or None, default=128
        Side in pixels to which files are resized, or as :func:`read_image` takes it
        (None: native resolution, for a tiled :class:`~skanomaly.AnomalyPipeline`,
        whose batches may then differ in size); unused for arrays.
    keep_aspect : bool, default=False
        Resize the short side of files to ``image_size`` (see :func:`read_image`).
    long_side_step : int >= 1, default=1
        With ``keep_aspect``: the step of the long side (see :func:`target_size`).
    verbose : bool, default=False
        Show a tqdm progress bar over the batches on stderr.

    Returns
    -------
    pipeline : sklearn.pipeline.Pipeline
        The same object, fitted.

    Raises
    ------
    TypeError
        If ``pipeline`` is not a Pipeline ending in a skanomaly detector, or ``source``
        is of an unsupported type.
    ValueError
        If there are no images, a file cannot be read (:class:`ImageReadError`), or a
        step rejects a batch (see the detector's ``partial_fit``). Batches absorbed
        before the error stay absorbed.

    Warns
    -----
    skanomaly.base.CalibrationWarning
        Only when the final threshold comes from in-sample scores (a stream of one
        small batch): the in-sample threshold of a small first batch, which later
        batches replace, is not reported.

    See Also
    --------
    iter_image_batches : the reader.
    skanomaly.calibrate : set the threshold from held-out normal images afterwards.

    Notes
    -----
    Streaming follows scikit-learn's out-of-core learning (``partial_fit`` over
    mini-batches, "Strategies to scale computationally: bigger data" in its user
    guide); the detectors' mergeable states are described in their classes
    (moments merged by Chan et al.'s pairwise update; merge-and-reduce coresets,
    Har-Peled and Mazumdar, 2004; reservoir sampling, Vitter's algorithm R).

    Examples
    --------
    Ten brick crops written as PNG files, fitted four at a time; the PaDiM moments
    equal those of ``fit`` on all ten:

    >>> import tempfile
    >>> from pathlib import Path
    >>> import numpy as np
    >>> from PIL import Image
    >>> from sklearn.base import clone
    >>> from sklearn.pipeline import make_pipeline
    >>> from skanomaly import PaDiMDetector
    >>> from skanomaly.datasets import load_textures
    >>> from skanomaly.features import FeatureExtractor
    >>> from skanomaly.streaming import iter_image_batches, partial_fit_images
    >>> crops = load_textures("brick", n_train=10, n_test=1, image_size=32).X_train
    >>> model = make_pipeline(
    ...     FeatureExtractor("resnet18", ["layer1", "layer2"], random_state=0, device="cpu"),
    ...     PaDiMDetector(n_features=8, random_state=0, device="cpu"))
    >>> whole = clone(model)
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     for i, crop in enumerate(crops):
    ...         pixels = np.round(crop.transpose(1, 2, 0) * 255).astype(np.uint8)
    ...         Image.fromarray(pixels).save(Path(folder) / f"{i:03d}.png")
    ...     model = partial_fit_images(model, folder, batch_size=4, image_size=32)
    ...     images = np.concatenate(list(iter_image_batches(folder, 4, image_size=32)))
    >>> model[-1].n_samples_seen_, model[-1].calibration_
    (10, 'leave-one-out')
    >>> whole = whole.fit(images)
    >>> bool(np.allclose(model[-1].covariance_, whole[-1].covariance_, rtol=1e-8))
    True
    >>> bool(np.allclose(model.score_samples(images), whole.score_samples(images)))
    True
    """
    from sklearn.pipeline import Pipeline

    from .base import BaseDetector, CalibrationWarning

    if not isinstance(pipeline, Pipeline):
        raise TypeError("pipeline must be a sklearn.pipeline.Pipeline ending in a skanomaly "
                        f"detector, got {type(pipeline).__name__}")
    detector = pipeline[-1]
    if not isinstance(detector, BaseDetector) or not hasattr(detector, "partial_fit"):
        raise TypeError("the last step of pipeline must be a skanomaly detector with "
                        f"partial_fit, got {type(detector).__name__}")
    batch_size = _check_int(batch_size, "batch_size", 1)
    image_size = _check_image_size(image_size, keep_aspect)
    _check_int(long_side_step, "long_side_step", 1)
    paths = _image_source(source)
    if paths is not None:
        batches = _batches(paths, batch_size, image_size, keep_aspect, long_side_step)
        n_batches = math.ceil(len(paths) / batch_size)
    elif isinstance(source, (str, bytes)) or not isinstance(source, Iterable):
        raise TypeError("source must be a folder, image paths, an array of images or an "
                        f"iterable of batches, got {type(source).__name__}")
    elif hasattr(source, "shape") or (isinstance(source, (list, tuple)) and source
                                      and np.ndim(source[0]) == 3):
        X = source if hasattr(source, "shape") else np.asarray(source)
        if len(X) == 0:
            raise ValueError("no images: source holds 0 samples")
        batches, n_batches = _array_batches(X, batch_size), math.ceil(len(X) / batch_size)
    else:
        batches, n_batches = iter(source), None
    if verbose:
        from tqdm.auto import tqdm

        batches = tqdm(batches, total=n_batches, desc="fitting", unit="batch",
                       file=sys.stderr, leave=False)
    transformers = [step for _, step in pipeline.steps[:-1]
                    if step is not None and step != "passthrough"]
    # an AnomalyPipeline of an extractor then a detector streams fused: each batch's
    # features go to the detector as tensors on its device, never through numpy
    fused = getattr(pipeline, "_fused_steps", lambda X: None)(None) is not None
    n_seen = 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CalibrationWarning)
        for images in batches:
            if fused:
                pipeline.partial_fit(images)
                n_seen += len(images)
                continue
            Xt = images
            for step in transformers:
                if n_seen == 0 and not _is_fitted(step):
                    step.fit(Xt)
                Xt = step.transform(Xt)
            detector.partial_fit(Xt)
            n_seen += len(Xt)
    in_sample = getattr(detector, "calibration_", None) == "in-sample"
    for w in caught:
        # a small first batch's in-sample threshold is replaced by later batches': warn
        # only when the final threshold is still in-sample
        if not issubclass(w.category, CalibrationWarning) or in_sample:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if n_seen == 0:
        raise ValueError("no images: source gave no batches")
    return pipeline
