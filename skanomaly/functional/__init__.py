"""Pure PyTorch kernels of skanomaly.

Tensors in, tensors out: dtype and device follow the input, inputs are never
mutated, and nothing here imports scikit-learn. On the CPU two kernels hand their
inner loop to the BLAS that numpy and scipy bundle, where torch has no equivalent
routine (:func:`cov`'s symmetric rank-k update) or streams memory more slowly
(:func:`k_center_greedy`'s matrix-vector products); the arithmetic is the same.
The estimators in :mod:`skanomaly` are thin layers over these functions.
"""

from .covariance import MomentAccumulator, cov
from .decomposition import (
    PCAFit,
    PCAProjection,
    pca_fit,
    pca_inverse_transform,
    pca_transform,
)
from .kde import GaussianKDE, gaussian_kde_logpdf, kde_covariance
from .leave_one_out import leave_one_out_from_residuals, leave_one_out_mahalanobis
from .mahalanobis import (
    GaussianScorer,
    WoodburyGaussianScorer,
    mahalanobis,
    mahalanobis_woodbury,
    precision_cholesky,
    regularized_cholesky,
    tril_inverse,
    woodbury_factor,
)
from .neighbors import KNNIndex, knn_distances, pairwise_sq_distances
from .sampling import (johnson_lindenstrauss_min_dim, k_center_greedy,
                       sparse_random_projection_matrix)
from .spatial import gaussian_blur2d, gaussian_kernel1d, upsample_bilinear
from .tiling import resize_tiles, tile, tile_grid, untile

# helpers the estimators share, public to the package (not in __all__, not the documented
# API): the finiteness check that reports one flag per call, exact power-of-two scaling,
# and packed triangular matrices
from ._packing import PackedMatrices  # noqa: F401
from ._validation import (all_finite, frexp_exponent, ldexp, ldexp_,  # noqa: F401
                          max_abs_exponent, range_error)
from .mahalanobis import cholesky_ex, tril_inverse_workspace  # noqa: F401

__all__ = [
    "cov",
    "MomentAccumulator",
    "regularized_cholesky",
    "tril_inverse",
    "precision_cholesky",
    "mahalanobis",
    "woodbury_factor",
    "mahalanobis_woodbury",
    "GaussianScorer",
    "WoodburyGaussianScorer",
    "leave_one_out_mahalanobis",
    "leave_one_out_from_residuals",
    "PCAFit",
    "PCAProjection",
    "pca_fit",
    "pca_transform",
    "pca_inverse_transform",
    "GaussianKDE",
    "gaussian_kde_logpdf",
    "kde_covariance",
    "KNNIndex",
    "knn_distances",
    "pairwise_sq_distances",
    "k_center_greedy",
    "johnson_lindenstrauss_min_dim",
    "sparse_random_projection_matrix",
    "gaussian_kernel1d",
    "gaussian_blur2d",
    "upsample_bilinear",
    "resize_tiles",
    "tile",
    "tile_grid",
    "untile",
]
