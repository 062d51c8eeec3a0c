"""Exact nearest-neighbour search by chunked matrix products.

Squared Euclidean distances are expanded as ``|a|^2 + |b|^2 - 2 a.b`` so the bulk of
the work is one matrix product per block of queries and bank rows (as faiss'
``IndexFlatL2`` and scikit-learn's ``euclidean_distances``). Both sides are first
centred on the mean of the reference set, which keeps the cancellation error of
the expansion at the scale of the data's spread rather than of its distance from
the origin. :class:`KNNIndex` prepares the bank once for repeated searches.
"""

from __future__ import annotations

import math

import torch

from ._validation import as_float_tensor, check_finite, check_ndim, check_positive_int

__all__ = ["KNNIndex", "knn_distances", "pairwise_sq_distances"]

_CPU_BLOCK_BYTES = 16 * 2**20  # one (query chunk, bank tile) block of distances on the CPU
_CPU_TILE = 4096  # bank rows per block on the CPU (faiss' IndexFlatL2 uses 1024)
_DEVICE_BLOCK_BYTES = 256 * 2**20  # accelerators: whole bank per block, bounded memory


class KNNIndex:
    """Exact Euclidean nearest-neighbour index over a fixed bank of points.

    The analogue of faiss' ``IndexFlatL2``: building the index centres the
    bank and computes its squared norms once, so that repeated searches
    (PatchCore scoring one batch of images after another) pay only the
    matrix products.

    Parameters
    ----------
    bank : Tensor of shape (n, n_features)
        Reference points (e.g. PatchCore's memory bank), float32 or float64
        (integers are promoted), on any device. Not modified; the index keeps
        a centred copy.

    Attributes
    ----------
    n_samples : int
        Number of points ``n`` in the bank.
    n_features : int
        Width of the points.
    dtype : torch.dtype
        Dtype of the stored bank.
    device : torch.device
        Device of the stored bank; queries must be there too.

    Raises
    ------
    TypeError
        If ``bank`` is not a tensor.
    ValueError
        If ``bank`` is not 2-D, is empty, or holds NaN or infinity.

    See Also
    --------
    knn_distances : one search without keeping the index.

    Notes
    -----
    Squared distances are expanded as ``|q - c|^2 + |b - c|^2 - 2 (q - c).(b - c)``
    with ``c`` the mean of the bank, which keeps the cancellation error at the
    scale of the data's spread rather than of its distance from the origin.
    On the CPU the search runs over blocks of at most 16 MB (queries x 4,096
    bank rows, the tiling of faiss' ``IndexFlatL2``, which uses 1,024) and keeps
    a running minimum, so the block stays in cache and is never reallocated;
    on an accelerator one block spans the whole bank (about 256 MB of queries).

    References
    ----------
    J. Johnson, M. Douze and H. Jégou, "Billion-scale similarity search with
    GPUs", IEEE Transactions on Big Data, 2019 (faiss' ``IndexFlatL2``).

    Examples
    --------
    >>> import torch
    >>> index = KNNIndex(torch.tensor([[0.0, 0.0], [3.0, 4.0], [1.0, 0.0]]))
    >>> index.search(torch.tensor([[0.0, 0.5]]), n_neighbors=2)
    (tensor([[0.5000, 1.1180]]), tensor([[0, 2]]))
    >>> index.n_samples, index.n_features
    (3, 2)
    """

    def __init__(self, bank):
        bank = check_finite(check_ndim(as_float_tensor(bank, "bank"), 2, "bank"), "bank")
        if bank.shape[0] == 0:
            raise ValueError("bank is empty: the index needs at least one point")
        self._shift = bank.mean(0)
        self._bank = bank - self._shift
        self._bank_sq = self._bank.square().sum(1)

    @property
    def n_samples(self) -> int:
        """Number of points in the bank."""
        return self._bank.shape[0]

    @property
    def n_features(self) -> int:
        """Width of the points."""
        return self._bank.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the stored bank."""
        return self._bank.dtype

    @property
    def device(self) -> torch.device:
        """Device of the stored bank."""
        return self._bank.device

    def __repr__(self) -> str:
        return (f"KNNIndex(n_samples={self.n_samples}, n_features={self.n_features}, "
                f"dtype={self.dtype}, device={self.device})")

    def search(self, queries, n_neighbors=1, *, squared=False, chunk_size=None,
               tile_size=None):
        """The ``n_neighbors`` nearest bank points of each query.

        Parameters
        ----------
        queries : Tensor of shape (m, n_features)
            On the index's device. Not modified. Promoted with the bank's dtype.
        n_neighbors : int, default=1
            Neighbours per query, between 1 and ``n_samples``.
        squared : bool, default=False
            Return squared Euclidean distances instead of distances.
        chunk_size : int, optional
            Queries per block; by default a block of distances takes about
            16 MB on the CPU and 256 MB elsewhere.
        tile_size : int, optional
            Bank rows per block; by default 4,096 on the CPU and the whole
            bank elsewhere.

        Returns
        -------
        distances : Tensor of shape (m, n_neighbors)
            Euclidean (or squared) distances, ascending along each row, in
            the promoted dtype.
        indices : LongTensor of shape (m, n_neighbors)
            Rows of the bank at those distances. The order of exactly tied
            neighbours is unspecified.

        Raises
        ------
        TypeError
            If ``queries`` is not a tensor, or ``n_neighbors``, ``chunk_size``
            or ``tile_size`` is not an int.
        ValueError
            If ``queries`` is not 2-D, holds NaN or infinity, has a different
            width or device than the bank, or ``n_neighbors`` exceeds the bank
            size, or ``n_neighbors``, ``chunk_size`` or ``tile_size`` is below 1.

        Examples
        --------
        >>> import torch
        >>> index = KNNIndex(torch.tensor([[0.0], [2.0], [5.0]]))
        >>> index.search(torch.tensor([[1.8], [4.0]]), squared=True)
        (tensor([[0.0400],
                [1.0000]]), tensor([[1],
                [2]]))
        """
        queries = check_finite(check_ndim(as_float_tensor(queries, "queries"), 2, "queries"),
                               "queries")
        if queries.shape[1] != self.n_features:
            raise ValueError(f"queries have {queries.shape[1]} features but the bank has "
                             f"{self.n_features}")
        if queries.device != self.device:
            raise ValueError(f"queries are on {queries.device} but the bank is on {self.device}")
        k = check_positive_int(n_neighbors, "n_neighbors")
        n_bank = self.n_samples
        if k > n_bank:
            raise ValueError(f"n_neighbors={k} exceeds the {n_bank} points of the bank")
        dtype = torch.promote_types(queries.dtype, self.dtype)
        bank, bank_sq, shift = (t.to(dtype) for t in (self._bank, self._bank_sq, self._shift))
        cpu = bank.device.type == "cpu"
        if tile_size is None:
            tile = min(n_bank, _CPU_TILE) if cpu else n_bank
        else:
            tile = min(n_bank, check_positive_int(tile_size, "tile_size"))
        if chunk_size is None:
            budget = _CPU_BLOCK_BYTES if cpu else _DEVICE_BLOCK_BYTES
            chunk = max(1, budget // (tile * bank.element_size()))
        else:
            chunk = check_positive_int(chunk_size, "chunk_size")
        m = queries.shape[0]
        distances = torch.empty(m, k, dtype=dtype, device=bank.device)
        indices = torch.empty(m, k, dtype=torch.long, device=bank.device)
        block = torch.empty(min(chunk, m), tile, dtype=dtype, device=bank.device)
        for start in range(0, m, chunk):
            q = queries[start : start + chunk].to(dtype) - shift
            found = (distances[start : start + q.shape[0]], indices[start : start + q.shape[0]])
            for j in range(0, n_bank, tile):
                b = bank[j : j + tile]
                partial = torch.addmm(bank_sq[j : j + tile], q, b.T, alpha=-2.0,
                                      out=block[: q.shape[0], : b.shape[0]])
                _merge(partial, j, k, found, first=j == 0)
            found[0].add_(q.square().sum(1)[:, None])
        distances.clamp_(min=0.0)
        return (distances, indices) if squared else (distances.sqrt_(), indices)


def _merge(partial: torch.Tensor, offset: int, k: int, found, *, first: bool) -> None:
    """Fold a block of partial distances (bank rows from ``offset``) into ``found``."""
    best, where = found
    if k == 1:  # a plain reduction is markedly faster than topk
        value, index = torch.min(partial, 1, keepdim=True)
    else:
        value, index = torch.topk(partial, min(k, partial.shape[1]), largest=False)
    index += offset
    if first and value.shape[1] == k:
        best.copy_(value)
        where.copy_(index)
        return
    if first:  # a first tile narrower than k: fill with +inf placeholders
        best.fill_(math.inf)
        where.zero_()
    if k == 1:
        closer = value < best
        best.copy_(torch.where(closer, value, best))
        where.copy_(torch.where(closer, index, where))
        return
    value, pick = torch.topk(torch.cat((best, value), 1), k, largest=False)
    best.copy_(value)
    where.copy_(torch.cat((where, index), 1).gather(1, pick))


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
        Queries per block; by default a block of distances takes about 16 MB on
        the CPU and 256 MB elsewhere, which bounds the memory whatever ``m``.

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

    See Also
    --------
    KNNIndex : the same search with the bank prepared once, for repeated queries.

    Notes
    -----
    Brute force as faiss' ``IndexFlatL2``: per block of queries and bank rows,
    one matrix product against the centred bank gives ``|b_j|^2 - 2 q.b_j`` and
    :func:`torch.topk` (:func:`torch.min` for one neighbour) keeps a running
    best; ``|q|^2`` is added to the ``k`` winners only. Results equal
    :class:`sklearn.neighbors.NearestNeighbors` up to rounding. Equivalent to
    ``KNNIndex(bank).search(queries, ...)``.

    Examples
    --------
    >>> import torch
    >>> bank = torch.tensor([[0.0, 0.0], [3.0, 4.0], [1.0, 0.0]])
    >>> knn_distances(torch.tensor([[0.0, 0.5]]), bank, n_neighbors=2)
    (tensor([[0.5000, 1.1180]]), tensor([[0, 2]]))
    """
    queries, bank = as_float_tensor(queries, "queries"), as_float_tensor(bank, "bank")
    # the bank is promoted before it is centred; KNNIndex and search validate each side once
    bank = bank.to(torch.promote_types(queries.dtype, bank.dtype))
    return KNNIndex(bank).search(queries, n_neighbors, squared=squared, chunk_size=chunk_size)
