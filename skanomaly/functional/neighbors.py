"""Exact nearest-neighbour search by chunked matrix products.

Squared Euclidean distances are expanded as ``|a|^2 + |b|^2 - 2 a.b`` so the bulk of
the work is one matrix product per chunk of queries (as faiss' ``IndexFlatL2`` and
scikit-learn's ``euclidean_distances``). Both sides are first centred on the
mean of the reference set, which keeps the cancellation error of the expansion
at the scale of the data's spread rather than of its distance from the origin.
"""

from __future__ import annotations

import torch

from ._validation import as_float_tensor, check_finite, check_ndim, check_positive_int

__all__ = ["knn_distances", "pairwise_sq_distances"]

_CHUNK_BYTES = 256 * 2**20  # one (chunk, n_bank) block of distances


def _check_pair(x, y, x_name: str, y_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Validated 2-D finite float tensors with equal widths, promoted to a common dtype."""
    x = check_finite(check_ndim(as_float_tensor(x, x_name), 2, x_name), x_name)
    y = check_finite(check_ndim(as_float_tensor(y, y_name), 2, y_name), y_name)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"{x_name} has {x.shape[1]} features but {y_name} has {y.shape[1]}")
    if x.device != y.device:
        raise ValueError(f"{x_name} is on {x.device} but {y_name} is on {y.device}")
    dtype = torch.promote_types(x.dtype, y.dtype)
    return x.to(dtype), y.to(dtype)


def pairwise_sq_distances(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances between the rows of ``x`` and those of ``y``.

    Parameters
    ----------
    x : Tensor of shape (m, n_features)
        Not modified.
    y : Tensor of shape (n, n_features)
        Not modified.

    Returns
    -------
    Tensor of shape (m, n)
        ``|x_i - y_j|^2``, clamped at zero, in the promoted dtype of the inputs.

    Raises
    ------
    TypeError
        If an input is not a tensor.
    ValueError
        If an input is not 2-D or holds NaN or infinity, the widths differ, or the
        inputs are on different devices.

    Notes
    -----
    One matrix product on inputs centred on the mean of ``y``; the rounding error
    is about ``eps * (|x_i - mean|^2 + |y_j - mean|^2)``, as for scikit-learn's
    :func:`~sklearn.metrics.pairwise.euclidean_distances` in float64.

    Examples
    --------
    >>> import torch
    >>> pairwise_sq_distances(torch.tensor([[0.0, 0.0], [1.0, 1.0]]), torch.tensor([[3.0, 4.0]]))
    tensor([[25.],
            [13.]])
    """
    x, y = _check_pair(x, y, "x", "y")
    shift = y.mean(0)
    x, y = x - shift, y - shift
    out = torch.addmm(y.square().sum(1), x, y.T, alpha=-2.0)
    return out.add_(x.square().sum(1)[:, None]).clamp_(min=0.0)


def knn_distances(
    queries: torch.Tensor,
    bank: torch.Tensor,
    n_neighbors: int = 1,
    *,
    squared: bool = False,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact k nearest neighbours in ``bank`` of each row of ``queries``.

    Parameters
    ----------
    queries : Tensor of shape (m, n_features)
        Not modified.
    bank : Tensor of shape (n, n_features)
        Reference points (e.g. PatchCore's memory bank). Not modified.
    n_neighbors : int, default=1
        Neighbours per query, between 1 and ``n``.
    squared : bool, default=False
        Return squared Euclidean distances instead of distances.
    chunk_size : int, optional
        Queries per block; by default a ``(chunk_size, n)`` block of distances
        takes about 256 MB, which bounds the memory whatever ``m``.

    Returns
    -------
    distances : Tensor of shape (m, n_neighbors)
        Euclidean (or squared) distances, ascending along each row, in the
        promoted dtype of the inputs.
    indices : LongTensor of shape (m, n_neighbors)
        Rows of ``bank`` at those distances. The order of exactly tied
        neighbours is unspecified.

    Raises
    ------
    TypeError
        If an input is not a tensor, or ``n_neighbors`` or ``chunk_size`` is not an int.
    ValueError
        If an input is not 2-D or holds NaN or infinity, the widths differ, the
        inputs are on different devices, ``n_neighbors`` exceeds the bank size,
        or ``n_neighbors`` or ``chunk_size`` is below 1.

    Notes
    -----
    Brute force as faiss' ``IndexFlatL2``: per block of queries, one matrix
    product against the centred bank gives ``|b_j|^2 - 2 q.b_j`` and
    :func:`torch.topk` (:func:`torch.min` for one neighbour) picks the smallest;
    ``|q|^2`` is added to the ``k`` winners only. Results equal
    :class:`sklearn.neighbors.NearestNeighbors` up to rounding.

    Examples
    --------
    >>> import torch
    >>> bank = torch.tensor([[0.0, 0.0], [3.0, 4.0], [1.0, 0.0]])
    >>> knn_distances(torch.tensor([[0.0, 0.5]]), bank, n_neighbors=2)
    (tensor([[0.5000, 1.1180]]), tensor([[0, 2]]))
    """
    queries, bank = _check_pair(queries, bank, "queries", "bank")
    k = check_positive_int(n_neighbors, "n_neighbors")
    n_bank = bank.shape[0]
    if k > n_bank:
        raise ValueError(f"n_neighbors={k} exceeds the {n_bank} points of the bank")
    if chunk_size is None:
        chunk = max(1, _CHUNK_BYTES // (n_bank * bank.element_size()))
    else:
        chunk = check_positive_int(chunk_size, "chunk_size")
    shift = bank.mean(0)
    bank = bank - shift
    bank_sq = bank.square().sum(1)
    m = queries.shape[0]
    distances = torch.empty(m, k, dtype=bank.dtype, device=bank.device)
    indices = torch.empty(m, k, dtype=torch.long, device=bank.device)
    block = torch.empty(min(chunk, m), n_bank, dtype=bank.dtype, device=bank.device)
    for start in range(0, m, chunk):
        q = queries[start : start + chunk] - shift
        stop = start + q.shape[0]
        partial = torch.addmm(bank_sq, q, bank.T, alpha=-2.0, out=block[: q.shape[0]])
        found = (distances[start:stop], indices[start:stop])
        if k == 1:  # a plain reduction is markedly faster than topk
            torch.min(partial, 1, keepdim=True, out=found)
        else:
            torch.topk(partial, k, largest=False, out=found)
        distances[start:stop] += q.square().sum(1)[:, None]
    distances.clamp_(min=0.0)
    return (distances, indices) if squared else (distances.sqrt_(), indices)
