"""PatchCore: nearest-neighbour distances to a coreset memory bank of patch features."""

from __future__ import annotations

import math
from numbers import Integral, Real

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.utils._param_validation import Interval

from ..base import BaseDetector, BaseSpatialDetector, _in_fixed_blocks, make_generator
from ..functional import (
    KNNIndex,
    johnson_lindenstrauss_min_dim,
    k_center_greedy,
    sparse_random_projection_matrix,
)

__all__ = ["PatchCoreDetector"]


class PatchCoreDetector(BaseSpatialDetector):
    """PatchCore anomaly detector over feature maps (Roth et al., 2022).

    Every position of every training feature map, after a ``p x p``
    neighbourhood average ("locally aware patch features"), is a patch
    feature. A coreset of them chosen by greedy k-center selection forms the
    memory bank. A test
    patch's anomaly score is its Euclidean distance to the nearest bank entry;
    an image's score is the largest patch score, re-weighted by the density of
    the bank around that patch's nearest neighbour (the paper's Eq. 7).

    Parameters
    ----------
    coreset_sampling_ratio : float in (0, 1], default=0.1
        Share of the training patches kept in the memory bank:
        ``max(1, int(n_patches * coreset_sampling_ratio))`` of them. With 1.0
        every patch is kept (in input order) and no coreset is selected.
    n_neighbors : int >= 1, default=9
        Size ``b`` of the neighbourhood ``N_b(m*)`` of the memory bank used to
        re-weight the image score (capped at the size of the memory bank);
        1 disables the re-weighting.
    patch_size : odd int >= 1, default=3
        Side ``p`` of the neighbourhood averaged into each locally aware patch
        feature (the paper's patchsize; anomalib fixes it at 3); 1 uses the
        features of each position as they are.
    projection_eps : float in (0, 1), default=0.9
        Distortion ``eps`` of the Johnson-Lindenstrauss bound that sets the
        dimension of the sparse random projection applied to the patches before
        k-center selection (anomalib's ``KCenterGreedy`` uses 0.9).
    random_state : int, RandomState instance or None, default=None
        Seeds the random projection and the first coreset centre.
    contamination : float in (0, 0.5], default=0.1
        Expected share of outliers; sets ``offset_`` (see :class:`BaseDetector`).
    device : {"auto", "cpu", "cuda", "mps"} or torch.device, default="auto"
        Where the kernels run.

    Attributes
    ----------
    memory_bank_ : ndarray of shape (n_bank, n_channels), float32
        The coreset of locally aware patch features.
    coreset_indices_ : ndarray of shape (n_bank,), int64
        Rows of the training patches kept in ``memory_bank_``, in order of
        selection. Patches are numbered image by image, then row-major over
        positions: patch ``(n, h, w)`` is row ``(n * H + h) * W + w``.
    bank_images_ : ndarray of shape (n_bank,), int64
        Training image of each bank entry (``coreset_indices_ // (H * W)``).
    input_shape_ : tuple of int
        Per-sample shape ``(C, H, W)`` seen in ``fit``.
    n_features_in_ : int
        Number of channels ``C``.
    offset_ : float
        Threshold on :meth:`score_samples` (see :class:`BaseDetector`).

    Raises
    ------
    ValueError
        From ``fit``, if ``patch_size`` is even (the grid would change size).

    See Also
    --------
    skanomaly.functional.k_center_greedy : the coreset selection.
    skanomaly.functional.KNNIndex : the nearest-neighbour search.

    Notes
    -----
    Input is a feature map (n_samples, C, H, W), typically the concatenation of
    several backbone layers upsampled to one grid; 2-D input (n_samples, C) is
    read as 1x1 maps. The local aggregation is
    ``torch.nn.AvgPool2d(p, 1, p // 2)`` (zero padding, counted in the
    average), anomalib's ``feature_pooler`` for ``p = 3``. anomalib applies it
    to each layer before upsampling and concatenating; here the input is
    already concatenated, so it is applied to ``X``. To match anomalib
    exactly, pool each layer yourself before upsampling and pass
    ``patch_size=1`` (pooling commutes with concatenation, not with upsampling).

    Memory bank. The patches are projected to
    ``johnson_lindenstrauss_min_dim(n_patches, projection_eps)`` dimensions by a
    sparse random matrix, then greedy k-center selection runs on the
    projections. When that dimension is not smaller than ``C``, projecting
    would not reduce the work (scikit-learn's ``SparseRandomProjection`` raises
    there), so the selection runs on the patches themselves. The projection
    matrix is drawn first, then the first centre, from one generator seeded by
    ``random_state``.

    Image score, as anomalib's ``PatchcoreModel.compute_anomaly_score``: with
    ``m_test*`` the test patch farthest from the bank, ``m*`` its nearest bank
    entry and ``s* = ||m_test* - m*||``, the ``b`` nearest bank entries to
    ``m*`` (``m*`` itself first) form ``N_b(m*)`` and

    ``s = (1 - softmax_{m in N_b(m*)}(||m_test* - m||)[m*]) * s*``.

    Threshold. A training patch is its own nearest neighbour when the coreset kept it,
    and the neighbouring patches of its image are close to it, so in-sample scores are
    optimistic. ``offset_`` is the ``contamination`` quantile of leave-one-image-out
    scores: each training image scored as above against the bank without the entries
    taken from that image (:class:`~skanomaly.functional.KNNIndex` groups; the coreset
    itself is not re-selected). Cost: one scoring pass over the training images, as an
    in-sample threshold would take. With a bank drawn from one image only, in-sample
    scores are used with a warning; :meth:`calibrate` sets it from held-out images.

    Where the memory bank has a single entry the weight is undefined (anomalib
    returns 0 there); this class then returns ``s*``, as for ``n_neighbors=1``.
    Distances to the bank are computed by blocked matrix products against an
    index of the bank built once after ``fit`` (the centred bank and its
    norms); the pixel scores are those of :meth:`anomaly_map`.

    References
    ----------
    K. Roth, L. Pemula, J. Zepeda, B. Schölkopf, T. Brox and P. Gehler,
    "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022.
    anomalib, ``anomalib.models.image.patchcore.torch_model.PatchcoreModel``.

    Examples
    --------
    >>> import numpy as np
    >>> from skanomaly.detectors import PatchCoreDetector
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(8, 16, 5, 5)).astype(np.float32)
    >>> det = PatchCoreDetector(coreset_sampling_ratio=0.5, random_state=0).fit(X)
    >>> det.memory_bank_.shape
    (100, 16)
    >>> det.anomaly_map(X[:2]).shape
    (2, 5, 5)
    >>> outlier = X[:1] + 10.0
    >>> bool(det.score_samples(outlier)[0] < det.score_samples(X).min())
    True
    """

    # float32 patch features and distances
    _max_abs = 1e36
    _range_reason = "patch distances in float32"
    # the nearest-neighbour search is batch-invariant by itself (exact distances)
    _fixed_blocks = False

    _parameter_constraints: dict = {
        **BaseDetector._parameter_constraints,
        "coreset_sampling_ratio": [Interval(Real, 0, 1, closed="right")],
        "n_neighbors": [Interval(Integral, 1, None, closed="left")],
        "patch_size": [Interval(Integral, 1, None, closed="left")],
        "projection_eps": [Interval(Real, 0, 1, closed="neither")],
        "random_state": ["random_state"],
    }

    def __init__(
        self,
        *,
        coreset_sampling_ratio=0.1,
        n_neighbors=9,
        patch_size=3,
        projection_eps=0.9,
        random_state=None,
        contamination=0.1,
        device="auto",
    ):
        super().__init__(contamination=contamination, device=device)
        self.coreset_sampling_ratio = coreset_sampling_ratio
        self.n_neighbors = n_neighbors
        self.patch_size = patch_size
        self.projection_eps = projection_eps
        self.random_state = random_state

    def _patches(self, X: torch.Tensor) -> torch.Tensor:
        """Locally aware patch features, (n_samples * H * W, C) float32."""
        p = self.patch_size
        pooled = X.to(torch.float32)
        if p > 1:
            pooled = F.avg_pool2d(pooled, kernel_size=p, stride=1, padding=p // 2)
        return pooled.permute(0, 2, 3, 1).reshape(-1, X.shape[1])

    def _fit(self, X: torch.Tensor) -> None:
        if self.patch_size % 2 == 0:
            raise ValueError(
                f"patch_size must be odd to keep the feature grid, got {self.patch_size}"
            )
        patches = self._patches(X)
        n_patches, n_channels = patches.shape
        n_centers = max(1, int(n_patches * self.coreset_sampling_ratio))
        if n_centers >= n_patches:
            indices = torch.arange(n_patches, device=patches.device)
        else:
            generator = make_generator(self.random_state, patches.device)
            dim = johnson_lindenstrauss_min_dim(n_patches, eps=self.projection_eps)
            projection = None
            if dim < n_channels:
                projection = sparse_random_projection_matrix(
                    dim, n_channels, generator=generator, dtype=patches.dtype,
                    device=patches.device,
                )
            indices = k_center_greedy(
                patches, n_centers, generator=generator, projection=projection
            )
        self.coreset_indices_ = indices.cpu().numpy().astype(np.int64)
        self.bank_images_ = self.coreset_indices_ // math.prod(X.shape[2:])
        self.memory_bank_ = patches[indices].cpu().numpy()

    def _bank_index(self) -> KNNIndex:
        return self._cached("bank_index", lambda: KNNIndex(
            self._device_tensor("memory_bank_"), groups=self._device_tensor("bank_images_")))

    def _nearest(self, X: torch.Tensor, images=None):
        """Patches (N, P, C), distance (N, P) and index (N, P) of their nearest bank entry.

        ``images`` (N,): the training image of each map, whose own bank entries are then
        excluded (leave-one-image-out scores).
        """
        patches = self._patches(X)
        n, per_image = X.shape[0], math.prod(X.shape[2:])
        groups = None if images is None else images.repeat_interleave(per_image)
        dist, idx = self._bank_index().search(patches, 1, query_groups=groups)
        return patches.view(n, per_image, -1), dist.view(n, -1), idx.view(n, -1)

    def _anomaly_map(self, X: torch.Tensor) -> torch.Tensor:
        return self._nearest(X)[1].view(X.shape[0], *X.shape[2:])

    def _score(self, X: torch.Tensor, images=None) -> torch.Tensor:
        patches, dist, idx = self._nearest(X, images)
        rows = torch.arange(X.shape[0], device=dist.device)
        worst = dist.argmax(dim=1)
        score = dist[rows, worst]
        bank = self._device_tensor("memory_bank_")
        n_support = min(self.n_neighbors, self._n_admissible(images))
        if n_support == 1:
            return score
        _, support = self._bank_index().search(bank[idx[rows, worst]], n_support,
                                               query_groups=images)
        # query and its support stacked, (N, 1 + b, C), in float64 (the squares of float32
        # patches may overflow float32); fixed-shape blocks keep the norms' reduction the
        # same whatever the batch
        stacked = torch.cat([patches[rows, worst][:, None], bank[support]], dim=1).to(
            torch.float64)
        gaps = _in_fixed_blocks(
            lambda t: torch.linalg.vector_norm(t[:, 1:] - t[:, :1], dim=-1), stacked, 8)
        return (1.0 - torch.softmax(gaps, dim=1)[:, 0]) * score

    def _n_admissible(self, images) -> int:
        """Bank entries every query may use: all, or those of other images than its own."""
        n_bank = self.memory_bank_.shape[0]
        if images is None:
            return n_bank
        return n_bank - int(np.bincount(self.bank_images_).max())

    def _out_of_sample_scores(self, X: torch.Tensor):
        """Leave-one-image-out scores: each image scored without its own bank entries."""
        if self._n_admissible(torch.empty(0)) < 1:
            return self._in_sample_scores(
                X, "the memory bank holds patches of a single training image, so there are "
                   "no leave-one-image-out scores")
        images = torch.arange(X.shape[0], device=X.device)
        return self._score(X, images), "leave-one-image-out"
