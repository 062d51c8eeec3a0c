"""A scikit-learn :class:`~sklearn.pipeline.Pipeline` that reaches its detector's maps.

``model[-1].anomaly_map(model[:-1].transform(X), output_size=...)`` becomes
``model.anomaly_map(X)``: :class:`AnomalyPipeline` is a ``Pipeline`` (same parameters,
``clone``, ``get_params``, grid search) with the detector's :meth:`anomaly_map` and
:meth:`calibrate`, :meth:`pvalues`, :meth:`calibrate_pixels` and :meth:`predict_mask`
reached through the earlier steps.

A pipeline of a :class:`~skanomaly.features.FeatureExtractor` then a skanomaly detector
over feature maps runs FUSED: images go to the device once, batch by batch; the features
stay there as tensors from the extractor to the detector (no numpy in between), the
extractor computes only the channels the detector reads (PaDiM's ``feature_indices_``,
selected before any resizing), and only scores and maps leave. The results are those of
the step-by-step pipeline, bitwise.
"""

from __future__ import annotations

from bisect import bisect_right
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.utils.metaestimators import available_if
from sklearn.utils.validation import check_is_fitted

from ._dask import is_dask_array
from .base import _like_input, _per_image_reduce, _predict_labels
from .functional.tiling import _MERGES, as_pair, resize_tiles, tile_grid, untile

__all__ = ["AnomalyPipeline", "make_anomaly_pipeline"]


def _final_has(attr):
    def check(self):
        getattr(self._final_estimator, attr)  # AttributeError: the method is not available
        return True

    return check


def _image_size(X):
    """(H, W) of 4-D image input ``X`` (any array-like or tensor), else None (also for a
    list of images of several sizes)."""
    if _image_list(X) is not None:
        return None
    shape = tuple(X.shape) if hasattr(X, "shape") else np.shape(X)
    return tuple(int(s) for s in shape[-2:]) if len(shape) == 4 else None


def _like(X, t):
    """:func:`~skanomaly.base._like_input` of results ``t`` of input ``X``: for a list of
    images of several sizes, in the namespace of its images (tensors on their device
    for tensors, else numpy); maps of several sizes are a list, each converted."""
    images = _image_list(X)
    like = X if images is None else images[0]
    if isinstance(t, list):
        return [_like_input(like, m) for m in t]
    return _like_input(like, t)


def _in_blocks(batches, block: int):
    """The rows of ``batches`` (tensors) regrouped into tensors of ``block`` rows, the
    last one shorter: the extractor's batches feed the detector's fixed-shape scoring
    blocks whole, so that only the call's last block is padded (not every batch's)."""
    pending, count = [], 0
    for batch in batches:
        pending.append(batch)
        count += len(batch)
        if count >= block:
            rows = torch.cat(pending)
            full = (count // block) * block
            yield rows[:full]
            pending, count = ([rows[full:]] if full < count else []), count - full
    if count:
        yield torch.cat(pending)


def _image_list(X):
    """The images of ``X`` when it is a list or tuple of images (C, H, W) of more than
    one size (a folder of mixed sizes), else None (one array of images, or images of one
    size, which stack into one)."""
    if not isinstance(X, (list, tuple)) or not X:
        return None
    shapes = set()
    for image in X:
        try:
            shape = tuple(image.shape) if hasattr(image, "shape") else np.shape(image)
        except ValueError:  # a ragged nested list: not an image
            return None
        if len(shape) != 3:
            return None
        shapes.add(tuple(int(s) for s in shape[1:]))
    return list(X) if len(shapes) > 1 else None


def _mixed_sizes_error(images, what: str) -> ValueError:
    sizes = sorted({tuple(int(s) for s in np.shape(i)[1:]) if not hasattr(i, "shape")
                    else tuple(int(s) for s in i.shape[1:]) for i in images})
    shown = ", ".join(f"{h}x{w}" for h, w in sizes[:3]) + (" ..." if len(sizes) > 3 else "")
    return ValueError(
        f"{what}: X is a list of images of {len(sizes)} sizes (height x width {shown}), "
        "but an untiled pipeline takes images of one size (n_samples, C, H, W); set "
        "tile_size to cut each image into tiles of one size, or resize the images to one")


class _Tiles:
    """The tiles of validated images as a lazy sequence of images: ``len``, ``shape``
    and slices ``[a:b]`` (an array of the type of the images), so that the extractor
    cuts the tiles of one batch at a time (memory bounded by a batch of tiles, not by
    all of them).

    ``groups`` is a list of validated 4-D arrays (numpy, or tensors on one device),
    the images of each of one size: one array for ordinary input, one per image for a
    list of images of several sizes. Each image is cut into its own grid of
    :func:`~skanomaly.functional.tile_grid` (same tile size), in order: the tiles of
    the first image, then the second's... With ``resize``, each slice's tiles are
    resized to it (:func:`~skanomaly.functional.resize_tiles`).
    """

    def __init__(self, groups, tile_size, stride, resize=None):
        for X in groups:
            if len(X.shape) != 4:
                raise ValueError(f"tiling needs 4-D images (n_samples, channels, height, "
                                 f"width), got shape {tuple(X.shape)}")
        self.groups = groups
        self.image_sizes = [tuple(int(s) for s in X.shape[-2:]) for X in groups]
        self.tile_size, self.resize = tile_size, resize
        self.grids = [tile_grid(size, tile_size, stride) for size in self.image_sizes]
        #: tiles of each image, in order
        self.counts = [len(grid) for X, grid in zip(groups, self.grids)
                       for _ in range(int(X.shape[0]))]
        #: index of the first tile of each group, and the number of tiles
        self.starts = np.cumsum([0] + [int(X.shape[0]) * len(grid)
                                       for X, grid in zip(groups, self.grids)]).tolist()
        self.shape = (self.starts[-1], int(groups[0].shape[1]),
                      *(tile_size if resize is None else resize))

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, key):
        start, stop, _ = key.indices(len(self))
        th, tw = self.tile_size
        parts = []
        for i in range(start, max(start, stop)):
            g = bisect_right(self.starts, i) - 1
            grid = self.grids[g]
            j = i - self.starts[g]
            image, (r, c) = j // len(grid), grid[j % len(grid)]
            parts.append(self.groups[g][image:image + 1, :, r:r + th, c:c + tw])
        if not parts:
            parts = [self.groups[0][:0, :, :th, :tw]]
        if isinstance(self.groups[0], torch.Tensor):
            tiles = torch.cat(parts)
            return tiles if self.resize is None else resize_tiles(tiles, self.resize)
        tiles = np.concatenate(parts)
        if self.resize is None:
            return tiles
        return resize_tiles(torch.from_numpy(tiles), self.resize).numpy()

    def per_image(self):
        """Tiles per image: an int when every image has as many, else the list."""
        return self.counts[0] if len(set(self.counts)) == 1 else list(self.counts)


@contextmanager
def _per_image_threshold(detector, n_tiles):
    """While the detector is fitted on tiles: its ``offset_`` from image scores (the
    largest of each image's ``n_tiles`` tile scores: an int, or a list of one count
    per image when the images' sizes differ), not tile scores."""
    detector._tiles_per_image = n_tiles
    try:
        yield
    finally:
        detector.__dict__.pop("_tiles_per_image", None)


class AnomalyPipeline(Pipeline):
    """A :class:`~sklearn.pipeline.Pipeline` ending in a skanomaly detector, with maps.

    Everything of scikit-learn's ``Pipeline`` (parameters, ``fit``, ``score_samples``,
    ``decision_function``, ``predict``, ``clone``, ``get_params``/``set_params``,
    :class:`~sklearn.model_selection.GridSearchCV`), plus :meth:`anomaly_map` (when the
    last step is a spatial detector: PaDiM, PatchCore, DFM), :meth:`calibrate` and
    :meth:`pvalues`, which run ``X`` through the earlier steps first.

    Parameters
    ----------
    steps : list of (str, estimator) tuples
        As in :class:`~sklearn.pipeline.Pipeline`; typically a
        :class:`~skanomaly.features.FeatureExtractor` then a detector.
    transform_input, memory, verbose
        As in :class:`~sklearn.pipeline.Pipeline`.
    tile_size : int, (int, int) or None, default=None
        Tile ``(height, width)`` in pixels; None: no tiling (each image is one sample).
        Given, each image is cut into tiles at its native resolution and every tile is
        a sample for the extractor and the detector (all tile positions share one
        Gaussian per feature position in PaDiM, one memory bank in PatchCore); the
        tiles' maps are stitched back at the image size and an image's score is the
        largest of its tiles' scores (see Notes). Needs the fused pipeline (a
        ``FeatureExtractor`` then a detector over feature maps) and images with both
        sides at least the tile's.
    tile_stride : int, (int, int) or None, default=None
        Step between tiles; None: ``tile_size`` (no overlap). At most ``tile_size``.
        Where it does not divide ``side - tile_size``, the last row (column) of tiles
        ends at the image border (no padding).
    tile_merge : {"mean", "max"}, default="mean"
        How the maps of overlapping tiles combine: their mean (anomalib's ``Tiler``) or
        their maximum.
    tile_resize : int, (int, int) or None, default=None
        Size ``(height, width)`` in pixels that every tile is resized to before the
        extractor (bilinear; antialiased when shrinking:
        :func:`~skanomaly.functional.resize_tiles`); None: tiles at native resolution.
        Larger than ``tile_size``, it zooms in: with 64-px tiles resized to 128, a
        backbone's stride-8 features fall every 4 image pixels, so that scratches one
        or two pixels wide reach them (at four times the backbone's work per tile).
        Each tile's map is computed at ``tile_size`` (the tile's own pixels), so the
        stitching and every result are as without it. Needs ``tile_size``.

    See Also
    --------
    make_anomaly_pipeline : Build one from estimators, naming the steps.
    skanomaly.export.to_torch : The fitted pipeline as one torch module.

    Notes
    -----
    With exactly two steps, a :class:`~skanomaly.features.FeatureExtractor` then a
    skanomaly detector that takes feature maps (PaDiM, PatchCore, DFM, DFKDE), ``fit``,
    ``score_samples``, ``decision_function``, ``predict``, :meth:`anomaly_map`,
    :meth:`score_and_map` and :meth:`calibrate` run fused: the images of each batch go
    to the extractor's device once, the features go to the detector's device as tensors
    (never through numpy), the extractor computes only the channels the detector keeps
    (PaDiM's random subset, selected before the layers are resized to a common grid),
    and only the scores and maps come back: numpy for numpy input, tensors on the
    input's device for tensor input. ``fit`` holds the training features of the kept
    channels on the detector's device (the out-of-sample scores that set ``offset_``
    need them), never the full N x all-channels array. Other pipelines (more steps,
    ``memory``, dask input, routed ``**params``) run step by step as
    :class:`~sklearn.pipeline.Pipeline` does.

    **Tiling** (``tile_size``; as anomalib's ``Tiler``, without its padding): the tiles
    of :func:`~skanomaly.functional.tile` go through the extractor batch by batch (they
    are cut per batch, never all at once) and the detector is fitted on them. Each
    tile's map is upsampled and blurred at the tile size, then the maps are stitched at
    the image size (:func:`~skanomaly.functional.untile`); ``output_size`` other than
    the image size resizes the stitched map bilinearly. An image's anomaly score is the
    largest score of its tiles (for PaDiM and PatchCore: the maximum of the stitched
    map at feature resolution), so that ``offset_`` is set per image from the
    out-of-sample scores of the training tiles (the threshold is per image, not per
    tile; with overlapping tiles, a tile's neighbours saw part of it, so call
    :meth:`calibrate` with held-out images for a threshold that holds);
    :meth:`calibrate_pixels` and :meth:`predict_mask` threshold the stitched maps.
    Every method returns one result per image. Images fitted and scored may have any
    size of at least the tile (each image's map comes back at its own size). ``X`` may
    be a list of images (C, H, W) of several sizes (a folder of mixed sizes, read at
    native resolution): each image is cut into its own grid of tiles of ``tile_size``,
    all the tiles are samples, scores are one array, and maps a list of one
    (H_i, W_i) map per image (one array when ``output_size`` is given); an untiled
    pipeline refuses such a list with a ValueError.
    ``tile_size`` equal to the image size is the untiled pipeline. With
    ``tile_resize``, the extractor and the detector see the resized tiles (the fitted
    state is that of the untiled pipeline fitted on them), and each tile's map is
    upsampled and blurred at ``tile_size`` before the stitching.

    Examples
    --------
    >>> import numpy as np
    >>> from skanomaly import AnomalyPipeline, FeatureExtractor, PaDiMDetector
    >>> X = np.random.default_rng(0).random((12, 3, 32, 32), dtype=np.float32)
    >>> model = AnomalyPipeline([
    ...     ("features", FeatureExtractor("resnet18", ["layer1"], random_state=0)),
    ...     ("padim", PaDiMDetector(n_features=8, random_state=0))]).fit(X)
    >>> model.anomaly_map(X[:2]).shape  # at the image size
    (2, 32, 32)
    >>> model.anomaly_map(X[:2], output_size=16).shape
    (2, 16, 16)

    Tiles of 32 pixels at stride 24 of 64 x 80 images, each image a 3 x 3 grid of
    tiles; maps at each image's own size, one score per image:

    >>> X = np.random.default_rng(0).random((4, 3, 64, 80), dtype=np.float32)
    >>> tiled = AnomalyPipeline([
    ...     ("features", FeatureExtractor("resnet18", ["layer1"], random_state=0)),
    ...     ("padim", PaDiMDetector(n_features=8, random_state=0))],
    ...     tile_size=32, tile_stride=24).fit(X)
    >>> tiled.score_samples(X).shape, tiled.anomaly_map(X[:1]).shape
    ((4,), (1, 64, 80))
    >>> tiled[-1].input_shape_  # the detector sees tiles: layer1's maps of a 32-px tile
    (64, 8, 8)

    The same tiles zoomed to 64 px before the backbone: finer features, same results'
    shapes:

    >>> zoomed = AnomalyPipeline([
    ...     ("features", FeatureExtractor("resnet18", ["layer1"], random_state=0)),
    ...     ("padim", PaDiMDetector(n_features=8, random_state=0))],
    ...     tile_size=32, tile_stride=24, tile_resize=64).fit(X)
    >>> zoomed[-1].input_shape_, zoomed.anomaly_map(X[:1]).shape
    ((64, 16, 16), (1, 64, 80))

    A list of images of several sizes, each cut into its own grid of tiles; a map per
    image at its size:

    >>> mixed = [X[0], X[1, :, :48, :], X[2, :, :32, :40]]
    >>> maps = tiled.fit(mixed).anomaly_map(mixed)
    >>> tiled[-1].n_samples_seen_  # 3 x 3 + 2 x 3 + 1 x 2 tiles
    17
    >>> [m.shape for m in maps]
    [(64, 80), (48, 80), (32, 40)]

    """

    def __init__(self, steps, *, transform_input=None, memory=None, verbose=False,
                 tile_size=None, tile_stride=None, tile_merge="mean", tile_resize=None):
        super().__init__(steps, transform_input=transform_input, memory=memory,
                         verbose=verbose)
        self.tile_size = tile_size
        self.tile_stride = tile_stride
        self.tile_merge = tile_merge
        self.tile_resize = tile_resize

    # ------------------------------------------------------------ tiling
    def _tiling(self):
        """(tile_size, stride, merge, resize): sizes as pairs of ints (resize None when
        the tiles keep their size), or None without tiling; ValueError/TypeError naming
        a bad parameter."""
        size = getattr(self, "tile_size", None)  # None: pickled before tiling existed
        resize = getattr(self, "tile_resize", None)  # None: pickled before it existed
        if size is None:
            for name in ("tile_stride", "tile_resize"):
                if getattr(self, name, None) is not None:
                    raise ValueError(f"{name} is set but tile_size is None: set tile_size "
                                     "to tile the images")
            return None
        size = as_pair(size, "tile_size")
        stride = size if self.tile_stride is None else as_pair(self.tile_stride,
                                                               "tile_stride")
        if stride[0] > size[0] or stride[1] > size[1]:
            raise ValueError(f"tile_stride {self.tile_stride!r} is larger than tile_size "
                             f"{self.tile_size!r}: the tiles would leave pixels uncovered")
        if self.tile_merge not in _MERGES:
            raise ValueError(f"tile_merge must be one of {_MERGES}, got {self.tile_merge!r}")
        if resize is not None:
            resize = as_pair(resize, "tile_resize")
            resize = None if resize == size else resize
        return size, stride, self.tile_merge, resize

    def _check_tiled(self, fused, X, what: str):
        """The tiling of this pipeline, checked to be runnable on ``X`` (fused); a
        ValueError for a list of images of several sizes without tiling."""
        tiling = self._tiling()
        images = _image_list(X)
        if tiling is None and images is not None:
            raise _mixed_sizes_error(images, what)
        if tiling is not None and fused is None:
            raise ValueError(
                f"{what} with tile_size needs the fused pipeline: exactly a "
                "FeatureExtractor then a skanomaly detector over feature maps, no memory, "
                "no routed parameters and no dask input")
        return tiling

    def _tiles(self, extractor, X, tiling, *, reset: bool) -> _Tiles:
        """Validated images ``X`` as a lazy sequence of their tiles; with ``reset``, the
        extractor is fitted on the first tile (its backbone and shapes). ``X`` may be a
        list of images (C, H, W) of several sizes: each is validated and cut into its
        own grid of tiles."""
        if reset:
            extractor._validate_params()
        images = _image_list(X)
        if images is None:
            groups = [extractor._validate_input(X, reset=reset)]
        else:
            if len({isinstance(image, torch.Tensor) for image in images}) > 1:
                raise TypeError("X mixes torch tensors and other arrays: give images of "
                                "one kind")
            groups = [extractor._validate_input(
                image[None] if isinstance(image, torch.Tensor) else np.asarray(image)[None],
                reset=reset and i == 0) for i, image in enumerate(images)]
            if isinstance(groups[0], torch.Tensor) and len({g.device for g in groups}) > 1:
                raise ValueError("X holds tensors on several devices: give images on one")
        tiles = _Tiles(groups, tiling[0], tiling[1], tiling[3])
        if reset:
            extractor._fit(tiles[:1])
            #: (C, H, W) of the (first) image fitted on (the export's default example)
            self.tiled_input_shape_ = tuple(int(s) for s in groups[0].shape[1:])
        return tiles

    # ------------------------------------------------------------ fused path
    def _fused_steps(self, X=None):
        """(extractor, detector) when this pipeline runs fused on ``X``, else None."""
        from .base import BaseDetector
        from .features import FeatureExtractor

        if len(self.steps) != 2 or self.memory is not None or is_dask_array(X):
            return None
        extractor, detector = self.steps[0][1], self.steps[1][1]
        if (isinstance(extractor, FeatureExtractor) and isinstance(detector, BaseDetector)
                and detector._sample_ndim > 1):
            return extractor, detector
        return None

    def fit(self, X, y=None, **params):
        """Fit the steps on ``X`` (fused where possible: see the class Notes).

        Parameters
        ----------
        X : array-like, torch.Tensor or list of arrays or tensors
            Training input of the first step: images (n_samples, C, H, W); with
            ``tile_size``, also a list of images (C, H, W) of several sizes, each cut
            into its own grid of tiles (see the class Notes).
        y : Ignored
            Not used, present for API consistency.
        **params : dict
            Routed to the steps as by :meth:`sklearn.pipeline.Pipeline.fit` (the
            pipeline then runs step by step).

        Returns
        -------
        self : AnomalyPipeline
            The fitted pipeline.
        """
        fused = None if params else self._fused_steps(X)
        tiling = self._check_tiled(fused, X, "fit")
        if fused is None:
            return super().fit(X, y, **params)
        extractor, detector = fused
        self._validate_steps()
        if tiling is None:
            extractor._validate_params()
            detector._validate_params()
            Xv, n_tiles = extractor._fit(X), 1
        else:
            detector._validate_params()
            Xv = self._tiles(extractor, X, tiling, reset=True)
            n_tiles = Xv.per_image()
        shape = extractor.feature_shape_
        channels = detector._fit_channels(shape[0])
        device = detector._device()
        features = torch.cat([f for _, f in extractor._feature_batches(Xv, channels, device)])
        with _per_image_threshold(detector, n_tiles):
            detector._fit_features(features, shape)
        return self

    def fit_predict(self, X, y=None, **params):
        """Fit on ``X`` and label its samples (+1 / -1) as the detector's ``fit_predict``
        does: from the out-of-sample scores that set ``offset_``.

        Parameters
        ----------
        X : array-like or torch.Tensor
            Training input of the first step.
        y : Ignored
            Not used, present for API consistency.
        **params : dict
            Routed as by :meth:`sklearn.pipeline.Pipeline.fit_predict`.

        Returns
        -------
        labels : ndarray of shape (n_samples,), int
            One per image (also when tiled).
        """
        if self._tiling() is None:
            return super().fit_predict(X, y, **params)
        self._check_tiled(None if params else self._fused_steps(X), X, "fit_predict")
        self.fit(X)
        detector = self._final_estimator
        normality = detector.__dict__["_device_cache"]["fit_normality"]
        return _predict_labels(normality - detector.offset_)

    def _fused_pass(self, fused, X, what, output_size=None, sigma=4.0):
        """Anomaly scores and/or maps of ``X`` through the fused steps (tensors on the
        detector's device): ``what`` is "scores", "maps" or "both"."""
        extractor, detector = fused
        check_is_fitted(detector)
        tiling = self._tiling()
        if tiling is not None:
            return self._tiled_pass(fused, X, what, tiling, output_size, sigma)
        return self._validated_pass(fused, extractor._validate_input(X, reset=False), what,
                                    output_size, sigma)

    @staticmethod
    def _validated_pass(fused, Xv, what, output_size, sigma):
        """:meth:`_fused_pass` of validated input ``Xv`` (images, or a :class:`_Tiles`)."""
        extractor, detector = fused
        post = detector._map_postprocess(output_size, sigma) if what != "scores" else None
        scores, maps = [], []
        batches = (features for _, features in extractor._feature_batches(
            Xv, detector._input_channels(), detector._device()))
        for features in _in_blocks(batches, detector._block_size()):
            features = detector._check_features(features)
            if what == "scores":
                scores.append(-detector._blockwise(detector._score, features).to(
                    torch.float64))
            elif what == "maps":
                maps.append(detector._blockwise(lambda x: post(detector._anomaly_map(x)),
                                                features))
            else:
                s, m = detector._score_and_map_blockwise(features, output_size, sigma)
                scores.append(s)
                maps.append(m)
        return (torch.cat(scores) if scores else None), (torch.cat(maps) if maps else None)

    def _tiled_pass(self, fused, X, what, tiling, output_size, sigma):
        """:meth:`_fused_pass` of a tiled pipeline: the tiles' scores and maps, then one
        score (the largest of its tiles') and one stitched map per image. The maps are
        a tensor (n_images, height, width), or, for a list of images of several sizes
        without ``output_size``, a list of one (height_i, width_i) tensor per image."""
        extractor, detector = fused
        tiles = self._tiles(extractor, X, tiling, reset=False)
        tile_scores, tile_maps = self._validated_pass(
            fused, tiles, what, None if what == "scores" else tiling[0], sigma)
        scores = maps = None
        if tile_scores is not None:  # normality: the least normal tile's
            scores = _per_image_reduce(tile_scores, tiles.per_image(), "amin")
        if tile_maps is not None:
            size = None if output_size is None else as_pair(output_size, "output_size")
            maps = []
            for g, image_size in enumerate(tiles.image_sizes):
                stitched = untile(tile_maps[tiles.starts[g]:tiles.starts[g + 1]].to(
                    torch.float64), image_size, tiling[1], tiling[2])
                if size is not None and size != image_size:
                    stitched = F.interpolate(stitched[:, None], size=size, mode="bilinear",
                                             align_corners=False)[:, 0]
                maps.append(stitched)
            if len(maps) == 1:
                maps = maps[0]
            elif len({tuple(m.shape[1:]) for m in maps}) == 1:
                maps = torch.cat(maps)
            else:  # one map per image, each at its image's size
                maps = [m for group in maps for m in group]
        return scores, maps

    def _default_size(self, X, output_size):
        from .features import FeatureExtractor

        if output_size is None and isinstance(self.steps[0][1], FeatureExtractor):
            return _image_size(X)
        return output_size

    @available_if(_final_has("score_samples"))
    def score_samples(self, X, **params):
        """Normality scores of ``X`` through the steps (higher = more normal).

        Parameters
        ----------
        X : array-like or torch.Tensor
            Input of the first step.
        **params : dict
            Routed as by :meth:`sklearn.pipeline.Pipeline.score_samples`.

        Returns
        -------
        scores : ndarray or torch.Tensor of shape (n_samples,), float64
            A tensor on ``X``'s device for a tensor ``X``, else numpy.
        """
        fused = None if params else self._fused_steps(X)
        self._check_tiled(fused, X, "score_samples")
        if fused is None:
            return super().score_samples(X, **params)
        return _like(X, self._fused_pass(fused, X, "scores")[0])

    @available_if(_final_has("decision_function"))
    def decision_function(self, X, **params):
        """``score_samples(X) - offset_`` of the detector, through the steps.

        Parameters
        ----------
        X : array-like or torch.Tensor
            Input of the first step.
        **params : dict
            Routed as by :meth:`sklearn.pipeline.Pipeline.decision_function`.

        Returns
        -------
        decision : ndarray or torch.Tensor of shape (n_samples,), float64
            Negative for outliers; a tensor on ``X``'s device for a tensor ``X``.
        """
        fused = None if params else self._fused_steps(X)
        self._check_tiled(fused, X, "decision_function")
        if fused is None:
            return super().decision_function(X, **params)
        return self.score_samples(X) - fused[1].offset_

    @available_if(_final_has("predict"))
    def predict(self, X, **params):
        """+1 (inlier) / -1 (outlier) for each sample of ``X``, through the steps.

        Parameters
        ----------
        X : array-like or torch.Tensor
            Input of the first step.
        **params : dict
            Routed as by :meth:`sklearn.pipeline.Pipeline.predict`.

        Returns
        -------
        labels : ndarray or torch.Tensor of shape (n_samples,), int
            A tensor on ``X``'s device for a tensor ``X``, else numpy.
        """
        fused = None if params else self._fused_steps(X)
        self._check_tiled(fused, X, "predict")
        if fused is None:
            return super().predict(X, **params)
        return _predict_labels(self.decision_function(X))

    @available_if(_final_has("anomaly_map"))
    def anomaly_map(self, X, output_size=None, sigma=4.0):
        """Per-pixel anomaly scores of ``X``: its detector's map through the earlier steps.

        Parameters
        ----------
        X : array-like or torch.Tensor
            Input of the first step: images (n_samples, C, H, W) for a pipeline that
            starts with a :class:`~skanomaly.features.FeatureExtractor`.
        output_size : int, (int, int) or None, default=None
            Map size (height, width) in pixels. ``None`` means the input image size
            (H, W) when the first step is a ``FeatureExtractor`` and ``X`` is 4-D,
            else the detector's feature resolution (no upsampling nor blur).
        sigma : float, default=4.0
            Standard deviation of the Gaussian blur in output pixels, applied when the
            map is upsampled (see the detector's ``anomaly_map``).

        Returns
        -------
        maps : ndarray or torch.Tensor of shape (n_samples, height, width), float64
            Higher = more anomalous; ``self[-1].anomaly_map(self[:-1].transform(X),
            output_size, sigma)``. A tensor on ``X``'s device for a tensor ``X``. For a
            list of images of several sizes (tiled) without ``output_size``: a list of
            one (height_i, width_i) map per image.

        Raises
        ------
        sklearn.exceptions.NotFittedError
            If the pipeline is not fitted.
        ValueError
            If ``X`` is invalid for the first step, or ``output_size``/``sigma`` for
            the detector.
        """
        check_is_fitted(self)
        output_size = self._default_size(X, output_size)
        fused = self._fused_steps(X)
        self._check_tiled(fused, X, "anomaly_map")
        if fused is not None:
            return _like(X, self._fused_pass(fused, X, "maps", output_size, sigma)[1])
        Xt = self[:-1].transform(X) if len(self) > 1 else X
        return self._final_estimator.anomaly_map(Xt, output_size=output_size, sigma=sigma)

    @available_if(_final_has("score_and_map"))
    def score_and_map(self, X, output_size=None, sigma=4.0):
        """Scores and maps of ``X`` from one pass through the steps.

        What anomalib's torch models return from one forward (``pred_score``,
        ``anomaly_map``): ``(score_samples(X), anomaly_map(X, output_size, sigma))``,
        each equal to its own method's result, for the cost of one.

        Parameters
        ----------
        X : array-like or torch.Tensor
            Input of the first step: images (n_samples, C, H, W).
        output_size : int, (int, int) or None, default=None
            As in :meth:`anomaly_map` (None: the input image size).
        sigma : float, default=4.0
            As in :meth:`anomaly_map`.

        Returns
        -------
        scores : ndarray or torch.Tensor of shape (n_samples,), float64
            Higher = more normal.
        maps : ndarray or torch.Tensor of shape (n_samples, height, width), float64
            Higher = more anomalous. Both tensors on ``X``'s device for a tensor ``X``.
            For a list of images of several sizes (tiled) without ``output_size``: a
            list of one (height_i, width_i) map per image.

        Raises
        ------
        sklearn.exceptions.NotFittedError
            If the pipeline is not fitted.
        ValueError
            If ``X`` is invalid for the first step, or ``output_size``/``sigma`` for
            the detector.

        Examples
        --------
        >>> import numpy as np
        >>> from skanomaly import FeatureExtractor, PaDiMDetector, make_anomaly_pipeline
        >>> X = np.random.default_rng(0).random((12, 3, 32, 32), dtype=np.float32)
        >>> model = make_anomaly_pipeline(FeatureExtractor(random_state=0),
        ...                               PaDiMDetector(n_features=20, random_state=0))
        >>> scores, maps = model.fit(X).score_and_map(X[:2])
        >>> scores.shape, maps.shape
        ((2,), (2, 32, 32))
        >>> bool((scores == model.score_samples(X[:2])).all())
        True
        """
        check_is_fitted(self)
        output_size = self._default_size(X, output_size)
        fused = self._fused_steps(X)
        self._check_tiled(fused, X, "score_and_map")
        if fused is not None:
            scores, maps = self._fused_pass(fused, X, "both", output_size, sigma)
            return _like(X, scores), _like(X, maps)
        Xt = self[:-1].transform(X) if len(self) > 1 else X
        return self._final_estimator.score_and_map(Xt, output_size=output_size, sigma=sigma)

    @available_if(_final_has("calibrate"))
    def calibrate(self, X, y=None):
        """Set the detector's threshold from held-out normal input, or from labelled
        validation input (see :func:`skanomaly.calibrate`).

        Parameters
        ----------
        X : array-like or torch.Tensor
            Normal samples not used in ``fit`` (or, with ``y``, labelled validation
            samples), in the input format of the first step.
        y : array-like of shape (n_samples,) or None, default=None
            None: the conformal threshold. +1 / -1 labels: the F1-maximising one.

        Returns
        -------
        self : AnomalyPipeline
            The pipeline, its detector's ``offset_`` and ``calibration_`` updated.

        Raises
        ------
        sklearn.exceptions.NotFittedError
            If the pipeline is not fitted.
        TypeError
            If the last step is not a skanomaly detector.
        """
        from .base import calibrate

        check_is_fitted(self)
        if self._tiling() is not None:  # the scores of whole images, labelled or not
            fused = self._fused_steps(X)
            self._check_tiled(fused, X, "calibrate")
            scores = self._fused_pass(fused, X, "scores")[0]
            if y is None:
                fused[1]._set_held_out_offset(scores)
            else:
                fused[1]._set_labelled_offset(scores, y)
            return self
        fused = None if y is not None else self._fused_steps(X)
        if fused is not None:
            fused[1]._set_held_out_offset(self._fused_pass(fused, X, "scores")[0])
            return self
        return calibrate(self, X, y)

    @available_if(_final_has("calibrate_pixels"))
    def calibrate_pixels(self, X, masks=None, *, output_size=None, sigma=4.0):
        """Set the detector's pixel threshold from validation input (spatial detectors).

        See :meth:`~skanomaly.base.BaseSpatialDetector.calibrate_pixels`: F1-maximising
        over the pixels of ``masks``, or without masks the conformal ``contamination``
        quantile of the pixels of normal input.

        Parameters
        ----------
        X : array-like or torch.Tensor
            Validation input of the first step.
        masks : array-like of bool of shape (n_samples, height, width), optional
            Ground truth; the maps are computed at its size.
        output_size : int, (int, int) or None, default=None
            Without ``masks``: the map size; ``None`` means as :meth:`anomaly_map` (the
            input image size after a ``FeatureExtractor``).
        sigma : float, default=4.0
            Blur of upsampled maps.

        Returns
        -------
        self : AnomalyPipeline
            The pipeline, its detector's pixel threshold set.

        Examples
        --------
        >>> import numpy as np
        >>> from skanomaly import AnomalyPipeline, FeatureExtractor, PaDiMDetector
        >>> X = np.random.default_rng(0).random((14, 3, 32, 32), dtype=np.float32)
        >>> model = AnomalyPipeline([
        ...     ("features", FeatureExtractor("resnet18", ["layer1"], random_state=0)),
        ...     ("padim", PaDiMDetector(n_features=8, random_state=0))]).fit(X[:10])
        >>> model.calibrate_pixels(X[10:]).predict_mask(X[:2]).shape
        (2, 32, 32)
        """
        from .features import FeatureExtractor

        check_is_fitted(self)
        if self._tiling() is not None:  # the stitched maps of whole images
            fused = self._fused_steps(X)
            self._check_tiled(fused, X, "calibrate_pixels")
            truth = None
            mixed = _image_list(X) is not None
            if masks is not None and mixed and output_size is None:
                # images of several sizes: one mask per image, at its size
                truth = [np.asarray(m).astype(bool) for m in masks]
            elif masks is not None:
                truth = np.asarray(masks).astype(bool)
                if truth.ndim != 3:
                    raise ValueError(f"masks must be (n_samples, height, width), got shape "
                                     f"{truth.shape}")
                output_size = tuple(truth.shape[1:])
            maps = self._fused_pass(fused, X, "maps", output_size, sigma)[1]
            if isinstance(truth, list) or isinstance(maps, list):
                # maps of several sizes: the threshold is over all their pixels
                if truth is not None:
                    if len(truth) != len(maps) or any(
                            t.shape != tuple(m.shape) for t, m in zip(truth, maps)):
                        raise ValueError(
                            f"masks must be one (height, width) mask per image of X, at "
                            f"its size: got {len(truth)} masks of sizes "
                            f"{[t.shape for t in truth][:3]}..., for {len(maps)} images of "
                            f"sizes {[tuple(m.shape) for m in maps][:3]}...")
                    truth = np.concatenate([t.ravel() for t in truth])[None]
                maps = torch.cat([m.reshape(-1) for m in maps])[None]
            fused[1]._set_pixel_threshold(maps, truth, output_size, sigma)
            return self
        first = self.steps[0][1]
        if masks is None and output_size is None and isinstance(first, FeatureExtractor):
            output_size = _image_size(X)
        Xt = self[:-1].transform(X) if len(self) > 1 else X
        self._final_estimator.calibrate_pixels(Xt, masks, output_size=output_size,
                                               sigma=sigma)
        return self

    @available_if(_final_has("predict_mask"))
    def predict_mask(self, X):
        """Predicted anomalous pixels of ``X``: the detector's, through the earlier steps.

        Parameters
        ----------
        X : array-like or torch.Tensor
            Input of the first step.

        Returns
        -------
        masks : ndarray of bool of shape (n_samples, height, width)
            ``self[-1].predict_mask(self[:-1].transform(X))`` (after
            :meth:`calibrate_pixels`).

        Examples
        --------
        See :meth:`calibrate_pixels`.
        """
        check_is_fitted(self)
        if self._tiling() is not None:
            from sklearn.exceptions import NotFittedError

            fused = self._fused_steps(X)
            self._check_tiled(fused, X, "predict_mask")
            detector = fused[1]
            if "pixel_threshold_" not in detector.__dict__:
                raise NotFittedError("the pipeline has no pixel threshold: call "
                                     "calibrate_pixels(X_val, masks) or calibrate_pixels("
                                     "X_normal) first")
            maps = self._fused_pass(fused, X, "maps", detector.pixel_map_size_,
                                    detector.pixel_sigma_)[1]
            maps = _like(X, maps)
            if isinstance(maps, list):  # images of several sizes
                return [m > detector.pixel_threshold_ for m in maps]
            return maps > detector.pixel_threshold_
        Xt = self[:-1].transform(X) if len(self) > 1 else X
        return self._final_estimator.predict_mask(Xt)

    @available_if(_final_has("pvalues"))
    def pvalues(self, X):
        """Conformal p-values of normality of ``X``: its detector's, through the earlier steps.

        See :meth:`~skanomaly.base.BaseDetector.pvalues` (after :meth:`calibrate` on
        held-out normal input): the share of calibration samples at least as anomalous,
        with the +1 correction.

        Parameters
        ----------
        X : array-like or torch.Tensor
            Input of the first step.

        Returns
        -------
        pvalues : ndarray of shape (n_samples,), float64
            ``self[-1].pvalues(self[:-1].transform(X))``.

        Raises
        ------
        sklearn.exceptions.NotFittedError
            If the pipeline is not fitted or its detector not calibrated.

        Examples
        --------
        >>> import numpy as np
        >>> from sklearn.preprocessing import StandardScaler
        >>> from skanomaly import GaussianDetector, make_anomaly_pipeline
        >>> rng = np.random.default_rng(0)
        >>> model = make_anomaly_pipeline(StandardScaler(), GaussianDetector(device="cpu"))
        >>> model = model.fit(rng.normal(size=(200, 2))).calibrate(rng.normal(size=(49, 2)))
        >>> model.pvalues([[0.0, 0.0], [9.0, 9.0]])
        array([1.  , 0.02])
        """
        from .base import pvalues

        check_is_fitted(self)
        fused = self._fused_steps(X)
        if self._check_tiled(fused, X, "pvalues") is not None:
            check_is_fitted(fused[1], "calibration_scores_")
        if fused is None or "calibration_scores_" not in fused[1].__dict__:
            return pvalues(self, X)  # step by step (or the detector's NotFittedError)
        scores = self._fused_pass(fused, X, "scores")[0]
        return _like(X, torch.from_numpy(fused[1]._pvalues_of(scores.cpu().numpy())))

    def partial_fit(self, X, y=None):
        """Update the pipeline with one more batch of (mostly) normal input.

        The extractor is fitted on the first batch (its backbone is built once); each
        batch's features go to the detector's ``partial_fit`` as tensors on its device.

        Parameters
        ----------
        X : array-like or torch.Tensor
            A batch of images (n_samples, C, H, W) of the size of the first batch.
        y : Ignored
            Not used, present for API consistency.

        Returns
        -------
        self : AnomalyPipeline
            The updated pipeline.

        Raises
        ------
        TypeError
            If the pipeline is not a FeatureExtractor then a detector with
            ``partial_fit``.
        ValueError
            If the batch is invalid for the extractor or the detector.
        """
        fused = self._fused_steps(X)
        if fused is None or not hasattr(fused[1], "partial_fit"):
            raise TypeError("AnomalyPipeline.partial_fit needs two steps: a "
                            "FeatureExtractor, then a skanomaly detector over feature maps")
        extractor, detector = fused
        tiling = self._tiling()
        fitted = hasattr(extractor, "model_")
        if tiling is not None:  # the tiles of this batch, cut batch by batch
            Xv = self._tiles(extractor, X, tiling, reset=not fitted)
        elif fitted:
            Xv = extractor._validate_input(X, reset=False)
        else:  # the first batch fits the extractor, which validates it once
            extractor._validate_params()
            Xv = extractor._fit(X)
        batches = extractor._feature_batches(Xv, device=detector._device())
        features = torch.cat([features for _, features in batches])
        with _per_image_threshold(detector, 1 if tiling is None else Xv.per_image()):
            detector.partial_fit(features)
        return self


def make_anomaly_pipeline(*steps, memory=None, verbose=False, tile_size=None,
                          tile_stride=None, tile_merge="mean", tile_resize=None):
    """An :class:`AnomalyPipeline` from estimators, named as
    :func:`~sklearn.pipeline.make_pipeline` names them (lowercased class names).

    Parameters
    ----------
    *steps : estimators
        Typically a :class:`~skanomaly.features.FeatureExtractor` then a detector.
    memory : str, object with the joblib.Memory interface or None, default=None
        As in :func:`~sklearn.pipeline.make_pipeline`.
    verbose : bool, default=False
        As in :func:`~sklearn.pipeline.make_pipeline`.
    tile_size, tile_stride, tile_merge, tile_resize
        Tiling (at native resolution, or each tile resized before the extractor): see
        :class:`AnomalyPipeline`.

    Returns
    -------
    AnomalyPipeline
        The unfitted pipeline.

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn.base import clone
    >>> from skanomaly import DFMDetector, FeatureExtractor, make_anomaly_pipeline
    >>> X = np.random.default_rng(0).random((12, 3, 32, 32), dtype=np.float32)
    >>> model = make_anomaly_pipeline(FeatureExtractor(random_state=0), DFMDetector())
    >>> [name for name, _ in model.steps]
    ['featureextractor', 'dfmdetector']
    >>> clone(model).fit(X).anomaly_map(X[:1]).shape
    (1, 32, 32)
    """
    plain = make_pipeline(*steps, memory=memory, verbose=verbose)
    return AnomalyPipeline(plain.steps, memory=memory, verbose=verbose, tile_size=tile_size,
                           tile_stride=tile_stride, tile_merge=tile_merge,
                           tile_resize=tile_resize)
