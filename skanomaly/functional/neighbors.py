"""Exact nearest-neighbour search: candidates by matrix products, distances by differences.

The bulk of the work is one matrix product per block of queries and bank rows:
squared Euclidean distances expanded as ``|q|^2 + |b|^2 - 2 q.b`` on vectors centred
on the bank's mean (as faiss' ``IndexFlatL2`` and scikit-learn's
``euclidean_distances``). :class:`KNNIndex` uses that expansion only to find a few
CANDIDATES per query, with a rigorous bound on its rounding error; the distances it
returns are recomputed exactly from the differences ``q - b``, in blocks of a fixed
shape, so a query's result is bitwise the same in any batch. :class:`KNNIndex`
prepares the bank once for repeated searches; it is a :class:`torch.nn.Module` whose
bank is a buffer, and its :meth:`~KNNIndex.forward` is the same search in a traceable,
ONNX-exportable form that scans the bank in chunks of a fixed size.
"""

from __future__ import annotations

import math
from numbers import Integral
from typing import NamedTuple

import torch
from torch import nn

from ._validation import (
    all_finite,
    as_float_tensor,
    check_finite,
    check_ndim,
    check_positive_int,
    frexp_exponent,
    ldexp,
    max_abs_exponent,
    working_dtype,
    range_error,
)

__all__ = ["KNNIndex", "knn_distances", "pairwise_sq_distances"]

_CPU_BLOCK_BYTES = 16 * 2**20  # one (query chunk, bank tile) block of distances on the CPU
_CPU_TILE = 4096  # bank rows per block on the CPU (faiss' IndexFlatL2 uses 1024)
_DEVICE_BLOCK_BYTES = 256 * 2**20  # accelerators: whole bank per block, bounded memory
_EXTRA = 3  # candidates kept per query beyond n_neighbors
_PAIR_BLOCK_ELEMENTS = 2**21  # entries of one fixed-shape block of exact differences
_MAX_PAIR_ROWS = 1024  # small widths: a block of at most 1,024 rows (single-threaded sizes)
_FAR_EXPONENT = 40  # queries beyond 2**40 x the bank's largest entry: exact pass only
_FORWARD_CHUNK = 4096  # bank rows per block of KNNIndex.forward
_FORWARD_EXTRA = 7  # candidates per chunk of KNNIndex.forward beyond n_neighbors
_GROUP = 64  # columns per group of the selection of candidates (see _block_smallest)
_PRUNE_VARIANCE = 0.97  # share of the bank's variance kept by the pruning projection
_PRUNE_EXTRA = 7  # candidates per query beyond n_neighbors in the pruned search
_PRUNE_MIN_BANK = 2048  # smaller banks: the plain search (nothing to gain)
_PRUNE_MIN_QUERIES = 256  # fewer queries in a call: the plain search
_PRUNE_BLOCK = 2048  # rows projected at a time


def _input_roundoff(dtype: torch.dtype, device: torch.device) -> float:
    """Unit roundoff of the matrix product's inputs beyond the working dtype's own.

    Zero unless float32 products may round their inputs to TF32 or bfloat16
    (``torch.set_float32_matmul_precision("high"/"medium")``, or CUDA's
    ``allow_tf32``): then 2**-11 or 2**-8, which the error bound must include.
    """
    if dtype != torch.float32:
        return 0.0
    precision = torch.get_float32_matmul_precision()
    if device.type == "cuda" and precision == "highest":
        matmul = torch.backends.cuda.matmul
        if matmul.allow_tf32 or getattr(matmul, "fp32_precision", "none") == "tf32":
            precision = "high"
    return {"highest": 0.0, "high": 2.0**-11}.get(precision, 2.0**-8)


def _check_groups(groups, n: int, name: str, device: torch.device) -> torch.Tensor:
    """Integer group labels of shape (n,), as int64 on ``device``."""
    if not isinstance(groups, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of integer group labels, got "
                        f"{type(groups).__name__}")
    if groups.is_floating_point() or groups.is_complex() or groups.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer group labels, got dtype {groups.dtype}")
    if groups.ndim != 1 or groups.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},), one label per row, got "
                         f"{tuple(groups.shape)}")
    return groups.to(device=device, dtype=torch.int64)


class _Prepared(NamedTuple):
    """The bank in one working dtype: scaled, centred, squared norms of the centred rows."""

    bank: torch.Tensor  # (n, d) scaled by 2**-exponent, not centred
    centre: torch.Tensor  # (d,) mean of ``bank``
    centred: torch.Tensor  # (n, d) bank - centre
    sq_norms: torch.Tensor  # (n,) |centred|^2
    max_norm: float  # max_j |centred_j|


class _Pruning(NamedTuple):
    """The bank in the pruning space: leading principal axes and the residual's norm."""

    basis: torch.Tensor  # (d, p) float64, every entry exact in the working dtype
    lower: _Prepared  # rows [b_c V, |b_c - b_c V V^T|] (n, p + 1), working dtype, zero centre
    delta: float  # bound on the spectral norm of V^T V - I


class KNNIndex(nn.Module):
    """Exact Euclidean nearest-neighbour index over a fixed bank of points.

    The analogue of faiss' ``IndexFlatL2``: building the index scales, centres
    and norms the bank once, so that repeated searches (PatchCore scoring one
    batch of images after another) pay only the matrix products. Results are
    batch-invariant: a query's distances and indices are bitwise the same
    whether it is searched alone or in any batch, in any order, with any
    ``chunk_size`` or ``tile_size``.

    Parameters
    ----------
    bank : Tensor of shape (n, n_features)
        Reference points (e.g. PatchCore's memory bank), float32 or float64 on
        any device; integers and booleans are promoted to the default dtype,
        float16 and bfloat16 are computed (and returned) in float32. Any finite
        values: the index rescales internally. Not modified; the index keeps
        its own copies.
    groups : Tensor of shape (n,), optional
        Integer group label of each bank row (e.g. the training image a patch
        came from), on any device. With ``query_groups`` in :meth:`search`,
        bank rows of a query's own group are excluded from its neighbours
        (leave-one-group-out, as for out-of-sample calibration of PatchCore).
    forward_chunk : int, default=4096
        Bank rows per block of :meth:`forward` (the exportable search): its
        intermediates are ``queries x forward_chunk`` distances, never
        ``queries x n``.
    forward_extra : int, default=7
        Candidates that :meth:`forward` keeps per chunk beyond ``n_neighbors``.

    Attributes
    ----------
    n_samples : int
        Number of points ``n`` in the bank.
    n_features : int
        Width of the points.
    dtype : torch.dtype
        Working dtype of the stored bank (float32 or float64).
    device : torch.device
        Device of the stored bank; queries must be there too.
    groups : LongTensor of shape (n,) or None
        A copy of the group labels.
    bank : Tensor of shape (n, n_features)
        Buffer: the bank times ``2**-e`` (see Notes), in the working dtype.
    bank_groups : LongTensor of shape (n,) or None
        Buffer: the group labels.
    centre, sq_norms : Tensor of shape (n_features,) and (n,)
        Buffers: the mean of ``bank`` and the squared norms of its centred rows.

    Raises
    ------
    TypeError
        If ``bank`` is not a tensor, ``groups`` is not an integer tensor, or
        ``forward_chunk`` or ``forward_extra`` is not an int.
    ValueError
        If ``bank`` is not 2-D, has no rows (axis 0) or no features (axis 1),
        or holds NaN or infinity, ``groups`` does not have shape (n,), or
        ``forward_chunk`` is below 1 or ``forward_extra`` below 0.

    See Also
    --------
    knn_distances : one search without keeping the index.

    Notes
    -----
    **Scale.** The bank is multiplied by ``2**-e``, with ``e`` the binary
    exponent of its largest absolute entry (so that entry lies in [0.5, 1)),
    and queries by the same factor; a power of two scales exactly, and the
    distances are scaled back at the end. Squares therefore neither overflow
    nor underflow for any finite input whose distances are representable: a
    bank of ``1e20`` or ``1e-300`` gives the same neighbours as one of ``1``.
    Queries more than ``2**40`` times larger than the bank's largest entry
    skip the matrix products (whose squares could overflow) and are searched
    exhaustively in their own scale. Distances far below the bank's scale
    (about ``tiny / eps`` of it) lose precision to gradual underflow and may
    tie at zero; the index of a tie is still well defined (see below).

    **Candidates.** Per block of queries and bank rows (on the CPU at most
    16 MB: queries x 4,096 bank rows, the tiling of faiss, which uses 1,024; on
    an accelerator one block spans the bank), one matrix product against the
    centred bank gives ``a_j = |q_c|^2 + |b_cj|^2 - 2 q_c.b_cj`` (``c`` the
    bank's mean), and a running :func:`torch.topk` keeps the
    ``K = n_neighbors + 3`` smallest. With unit roundoff ``u`` of the working
    dtype and ``n = n_features``, Higham's bound for inner products
    (``|fl(x.y) - x.y| <= gamma_n |x|.|y|``, ``gamma_n = n u / (1 - n u)``,
    any summation order, fused multiply-adds included) applied to the three
    terms, plus two roundings to combine them and the rounding of the
    centring (``|fl(q - c) - (q - c)| <= u |q - c|``), bounds the error of
    ``a_j`` against the true squared distance ``t_j`` by

    ``E = (n + 8) eps (|q_c| + max_j |b_cj|)**2 + 4 (n + 8) tiny``

    (``eps = 2u``: about twice the derived constant, to cover the norms
    being computed too; the ``tiny`` term covers underflow; float32 products
    that may round their inputs to TF32 or bfloat16 add ``4 u_in`` to the
    factor; ``|x|.|y| <= ||x|| ||y||`` by Cauchy-Schwarz). The returned
    distance ``r_j`` (below) has relative error at most ``rho = (n + 8) eps``
    (``gamma_{n+2}`` with margin: one rounding per difference, square and
    addition of non-negative terms), plus ``n tiny`` for underflow:
    ``|r_j - t_j| <= rho t_j + n tiny``. Let ``a_(k)`` be the k-th smallest
    candidate value. The k rows of smallest ``a`` have
    ``r_j <= (1 + rho)(a_(k) + E) + n tiny``, so the k-th smallest ``r`` of
    the bank, ``r*``, is at most that too; and every row among the k best by
    ``r`` has ``r_j <= r*``, hence ``t_j <= (r_j + n tiny) / (1 - rho)`` and

    ``a_j <= t_j + E <= theta = ((a_(k) + E)(1 + rho) + 2 n tiny) / (1 - rho) + E``

    (evaluated with a relative margin of ``16 eps`` for its own rounding). If
    the K-th candidate exceeds ``theta``, no row outside the candidates (all
    of which have ``a`` at least the K-th) can be among the k best: the
    candidate set is complete. Otherwise (near-ties at the k-th neighbour,
    e.g. duplicated bank rows) the query is searched exhaustively.

    **Pruning.** Large searches (no groups, a bank of at least 2,048 rows, at least
    256 queries per call) first rank the bank by a LOWER BOUND of the distance in
    few dimensions: the centred bank's leading principal axes ``V`` (``p`` of them,
    holding 97 % of its variance, from the eigenvectors of its scatter in float64,
    rounded to the working dtype) and the norm of the rest,
    ``l_j = |q_c V - b_cj V|^2 + (|q_c - q_c V V^T| - |b_cj - b_cj V V^T|)^2``, which
    is at most the squared distance (by the triangle inequality for the rest), up
    to ``delta``, the spectral norm of ``V^T V - I`` (bounded by its Frobenius norm
    in float64): ``l_j <= (1 + delta) t_j``. Rows and queries are projected in
    float64 and rounded to the working dtype; the matrix product that gives ``l``
    then costs ``(p + 1) / n_features`` of the full one (176 of 384 columns for
    PatchCore's resnet18 features). Its rounding, that of the projections and of
    the norm of the rest (``delta`` again, for the rest computed as
    ``|x|^2 - |x V|^2``) is bounded as above with a doubled constant:
    ``E' = (2 (p + 17) eps + 4 u_in + 4 delta) S + 4 (p + 9) tiny``, ``S =
    ((|q_c| + max_j |b_cj|)(1 + delta + 4 eps))^2``. The ``K = n_neighbors + 7``
    rows of smallest ``l`` get their exact distances ``r``; every other row has
    ``t_j >= (l_(K) - E') / (1 + delta)``, so if ``(l_(K) - E')(1 - rho) / (1 +
    delta) - n tiny`` (with a margin of ``16 eps``) exceeds the k-th smallest exact
    ``r`` of the candidates, no other row can be among the k best and the
    candidates hold them. Queries that fail the test (about 5 % of PatchCore's
    patches) take the search above. The projection is built on the first such
    search and kept; the k best are the same, bitwise, as without pruning.

    **Selection.** The candidates of a block are selected through the minima of
    groups of 64 columns: the k smallest values of a row lie in the k groups of
    smallest minimum, so a pass of minima and two small selections replace
    :func:`torch.topk` over the whole row (a pad of ``+inf`` completes the last
    group).

    **Exact distances.** The distances of the candidates (or, exhaustively,
    of every bank row) are recomputed as ``sum((q - b)**2)`` on the scaled,
    uncentred vectors, free of cancellation, in blocks of a fixed shape
    (``R`` pairs of rows, ``R`` depending on ``n_features`` only; the last
    block is padded). torch's reduction strategy depends on the shape of the
    tensor it reduces (a single row, for one, is split across threads), so
    the fixed shape makes each distance a function of its two rows alone. The
    ``n_neighbors`` best are then selected by (distance, index): exact ties
    go to the smaller bank index. Both routes give the same k best, so the
    result never depends on the batch, the block sizes or the route a query
    took. The recomputation costs ``O(m K n_features)``, a small fraction of
    the ``O(m n n_features)`` products.

    **Memory.** The index holds two copies of the bank in its working dtype
    (scaled, and scaled and centred), plus one more per other dtype of
    queries it was searched with (float64 queries against a float32 bank).
    Only the first is a buffer (``state_dict``, :meth:`forward`, exported graphs).

    **The exportable search.** :meth:`forward` is :meth:`search` without
    validation, groups or data-dependent control flow, for
    :func:`torch.jit.trace` and the ONNX exporter (opset 17, any number of
    queries). The bank is scanned in ``ceil(n / forward_chunk)`` chunks; per chunk
    one matrix product ranks the rows by ``|b_c|^2 - 2 q_c.b`` (``c`` the
    centre: the squared distance less a term constant per query, from the
    stored bank alone), :func:`torch.topk` keeps ``n_neighbors + forward_extra``
    candidates, their distances are recomputed exactly as ``sum((q - b)**2)``
    from the gathered rows, and a running selection by (distance, index) keeps
    the ``n_neighbors`` best over the chunks. A true neighbour is missed only if
    more than ``forward_extra`` rows of its chunk rank ahead of it within the
    rounding of the ranking (near-ties, e.g. duplicated rows; the distances
    returned are then still exact, of the rows found); :meth:`search`
    detects such queries and searches them exhaustively, :meth:`forward`
    cannot branch. Queries far beyond the bank's scale (see Scale) are not
    special-cased either. Memory: about ``queries x (forward_chunk + 2 (n_neighbors
    + forward_extra) n_features)`` numbers besides the bank, and an exported graph
    holds the bank once (the chunk offsets are computed from the input's shape,
    so that constant folding does not store each chunk again).

    References
    ----------
    J. Johnson, M. Douze and H. Jégou, "Billion-scale similarity search with
    GPUs", IEEE Transactions on Big Data, 2019 (faiss' ``IndexFlatL2``).
    N. J. Higham, "Accuracy and Stability of Numerical Algorithms", 2nd ed.,
    SIAM, 2002, section 3.1 (the inner-product bound ``gamma_n``).

    Examples
    --------
    >>> import torch
    >>> index = KNNIndex(torch.tensor([[0.0, 0.0], [3.0, 4.0], [1.0, 0.0]]))
    >>> index.search(torch.tensor([[0.0, 0.5]]), n_neighbors=2)
    (tensor([[0.5000, 1.1180]]), tensor([[0, 2]]))
    >>> index.n_samples, index.n_features
    (3, 2)

    Leave-one-group-out: a query never finds rows of its own group.

    >>> index = KNNIndex(torch.tensor([[0.0], [1.0], [5.0]]), groups=torch.tensor([0, 0, 1]))
    >>> index.search(torch.tensor([[0.0], [0.0]]), query_groups=torch.tensor([0, 1]))
    (tensor([[5.],
            [0.]]), tensor([[2],
            [0]]))

    The exportable form, scanning the bank two rows at a time:

    >>> index = KNNIndex(torch.tensor([[0.0, 0.0], [3.0, 4.0], [1.0, 0.0]]), forward_chunk=2)
    >>> index(torch.tensor([[0.0, 0.5]]), 2)
    (tensor([[0.5000, 1.1180]]), tensor([[0, 2]]))
    """

    def __init__(self, bank, groups=None, *, forward_chunk=_FORWARD_CHUNK,
                 forward_extra=_FORWARD_EXTRA):
        super().__init__()
        self.forward_chunk = check_positive_int(forward_chunk, "forward_chunk")
        if isinstance(forward_extra, bool) or not isinstance(forward_extra, Integral):
            raise TypeError(f"forward_extra must be an int, got {forward_extra!r}")
        if forward_extra < 0:
            raise ValueError(f"forward_extra must be at least 0, got {forward_extra}")
        self.forward_extra = int(forward_extra)
        bank = check_ndim(as_float_tensor(bank, "bank"), 2, "bank")
        n, d = bank.shape
        if n == 0:
            raise ValueError("bank is empty (0 rows along axis 0): the index needs at least "
                             "one point")
        if d == 0:
            raise ValueError(f"bank has 0 features (axis 1, shape {tuple(bank.shape)}): "
                             "distances need at least one coordinate")
        check_finite(bank, "bank")
        bank = bank.to(working_dtype(bank.dtype))
        self._exponent = int(frexp_exponent(bank.abs().amax()))
        self.register_buffer("bank", ldexp(bank, -self._exponent))  # a new tensor anyway
        self._n_bank = n
        self._prepared: dict[tuple, _Prepared] = {}
        self._pruning: dict[tuple, _Pruning | None] = {}
        prepared = self._prepare(self.bank.dtype)
        self.register_buffer("centre", prepared.centre)
        self.register_buffer("sq_norms", prepared.sq_norms)
        self._rows = max(16, min(_MAX_PAIR_ROWS, _PAIR_BLOCK_ELEMENTS // d))
        labels = values = counts = None
        if groups is not None:
            labels = _check_groups(groups, n, "groups", bank.device)
            values, counts = torch.unique(labels, return_counts=True)
        self.register_buffer("bank_groups", labels)
        self.register_buffer("_group_values", values, persistent=False)
        self.register_buffer("_group_counts", counts, persistent=False)

    @property
    def n_samples(self) -> int:
        """Number of points in the bank."""
        return self.bank.shape[0]

    @property
    def n_features(self) -> int:
        """Width of the points."""
        return self.bank.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        """Working dtype of the stored bank."""
        return self.bank.dtype

    @property
    def device(self) -> torch.device:
        """Device of the stored bank."""
        return self.bank.device

    @property
    def groups(self) -> torch.Tensor | None:
        """A copy of the bank's group labels (int64), or None."""
        return None if self.bank_groups is None else self.bank_groups.clone()

    def __repr__(self) -> str:
        grouped = "" if self.bank_groups is None else ", groups=True"
        return (f"KNNIndex(n_samples={self.n_samples}, n_features={self.n_features}, "
                f"dtype={self.dtype}, device={self.device}{grouped})")

    def _prepare(self, dtype: torch.dtype) -> _Prepared:
        """The bank in ``dtype`` (scaled, centred, norms), built once per dtype and device
        (the module may have been moved since)."""
        key = (dtype, self.bank.device, self.bank.dtype)
        prepared = self._prepared.get(key)
        if prepared is None:
            bank = self.bank.to(dtype)  # exact: dtype is never narrower
            centre = bank.mean(0)
            centred = bank - centre
            sq_norms = centred.square().sum(1)
            prepared = _Prepared(bank, centre, centred, sq_norms,
                                 float(sq_norms.max().sqrt()))
            self._prepared[key] = prepared
        return prepared

    def _check_query_groups(self, query_groups, m: int, k: int) -> torch.Tensor | None:
        if query_groups is None:
            return None
        if self.bank_groups is None:
            raise ValueError("query_groups needs an index built with groups: "
                             "KNNIndex(bank, groups=...)")
        labels = _check_groups(query_groups, m, "query_groups", self.device)
        if m:
            values, counts = self._group_values, self._group_counts
            pos = torch.searchsorted(values, labels).clamp_(max=values.shape[0] - 1)
            excluded = torch.where(values[pos] == labels, counts[pos], 0)
            short = (self.n_samples - excluded) < k
            if bool(short.any()):
                i = int(short.nonzero()[0, 0])
                raise ValueError(
                    f"query {i} (group {int(labels[i])}) has only "
                    f"{self.n_samples - int(excluded[i])} bank rows outside its group, "
                    f"fewer than n_neighbors={k}")
        return labels

    def search(self, queries, n_neighbors=1, *, squared=False, chunk_size=None,
               tile_size=None, query_groups=None):
        """The ``n_neighbors`` nearest bank points of each query.

        Parameters
        ----------
        queries : Tensor of shape (m, n_features)
            On the index's device. Not modified. Promoted with the bank's
            working dtype (float16 and bfloat16 as float32). ``m`` may be 0.
        n_neighbors : int, default=1
            Neighbours per query, between 1 and ``n_samples``.
        squared : bool, default=False
            Return squared Euclidean distances instead of distances.
        chunk_size : int, optional
            Queries per block of the matrix products; by default a block of
            distances takes about 16 MB on the CPU and 256 MB elsewhere. It
            changes the speed and memory only, never the result.
        tile_size : int, optional
            Bank rows per block; by default 4,096 on the CPU and the whole
            bank elsewhere. It changes the speed and memory only.
        query_groups : Tensor of shape (m,), optional
            Integer group label of each query; bank rows with the same label
            (see ``groups`` of the index) are excluded from its neighbours.
            Needs an index built with ``groups``.

        Returns
        -------
        distances : Tensor of shape (m, n_neighbors)
            Euclidean (or squared) distances, ascending along each row, in
            the promoted working dtype, computed exactly from the differences
            of the two rows (up to the rounding of that sum).
        indices : LongTensor of shape (m, n_neighbors)
            Rows of the bank at those distances; among equal distances the
            smaller index comes first (and is the one kept).

        Raises
        ------
        TypeError
            If ``queries`` is not a tensor, ``n_neighbors``, ``chunk_size``
            or ``tile_size`` is not an int, or ``query_groups`` is not an
            integer tensor.
        ValueError
            If ``queries`` is not 2-D, holds NaN or infinity, has a different
            width or device than the bank; if ``n_neighbors`` exceeds the
            bank size, or ``n_neighbors``, ``chunk_size`` or ``tile_size`` is
            below 1; if ``query_groups`` is given to an index without
            groups, does not have shape (m,), or leaves a query fewer than
            ``n_neighbors`` admissible bank rows (the message names it); or
            if the distances (``squared=True``: their squares) exceed the
            range of the working dtype, in which case float64 input, or
            ``squared=False``, gives them.

        Examples
        --------
        >>> import torch
        >>> index = KNNIndex(torch.tensor([[0.0], [2.0], [5.0]]))
        >>> index.search(torch.tensor([[1.8], [4.0]]), squared=True)
        (tensor([[0.0400],
                [1.0000]]), tensor([[1],
                [2]]))
        >>> index.search(torch.tensor([[1.0]]), 2)  # a tie: the smaller index first
        (tensor([[1., 1.]]), tensor([[0, 1]]))
        """
        queries = check_ndim(as_float_tensor(queries, "queries"), 2, "queries")
        if queries.shape[1] != self.n_features:
            raise ValueError(f"queries have {queries.shape[1]} features but the bank has "
                             f"{self.n_features}")
        if queries.device != self.device:
            raise ValueError(f"queries are on {queries.device} but the bank is on {self.device}")
        check_finite(queries, "queries")
        k = check_positive_int(n_neighbors, "n_neighbors")
        n_bank = self.n_samples
        if k > n_bank:
            raise ValueError(f"n_neighbors={k} exceeds the {n_bank} points of the bank")
        cpu = self.device.type == "cpu"
        if tile_size is None:
            tile = min(n_bank, _CPU_TILE) if cpu else n_bank
        else:
            tile = min(n_bank, check_positive_int(tile_size, "tile_size"))
        dtype = torch.promote_types(working_dtype(queries.dtype), self.dtype)
        if chunk_size is None:
            budget = _CPU_BLOCK_BYTES if cpu else _DEVICE_BLOCK_BYTES
            chunk = max(1, budget // (tile * dtype.itemsize))
        else:
            chunk = check_positive_int(chunk_size, "chunk_size")
        m = queries.shape[0]
        labels = self._check_query_groups(query_groups, m, k)
        prepared = self._prepare(dtype)
        if m == 0:
            return (torch.empty(0, k, dtype=dtype, device=self.device),
                    torch.empty(0, k, dtype=torch.long, device=self.device))
        q = queries.to(dtype)
        exponents = None  # per-query exponent of the result, where some query is far
        if max_abs_exponent(q) <= self._exponent + _FAR_EXPONENT:  # no query is far
            scaled = ldexp(q, -self._exponent)
            best, where = self._search_near(prepared, scaled, labels, k, chunk, tile)
            return self._unscale(best, exponents, squared), where
        peak = q.abs().amax(1)
        far = (peak > 0) & (frexp_exponent(peak) > self._exponent + _FAR_EXPONENT)
        best = torch.empty(m, k, dtype=dtype, device=self.device)
        where = torch.empty(m, k, dtype=torch.long, device=self.device)
        if bool(far.any()):
            near_rows = (~far).nonzero()[:, 0]
            far_rows = far.nonzero()[:, 0]
            exponents = torch.full((m,), self._exponent, dtype=torch.long, device=self.device)
            exponents[far_rows] = frexp_exponent(peak[far_rows])
            for i in far_rows.tolist():  # each in its own scale; rare by construction
                e = int(exponents[i])
                qi = ldexp(q[i : i + 1], -e)
                bank_i = ldexp(prepared.bank, self._exponent - e)
                gi = None if labels is None else labels[i : i + 1]
                best[i], where[i] = (t[0] for t in self._exhaustive(bank_i, qi, gi, k))
            if near_rows.numel():
                scaled = ldexp(q[near_rows], -self._exponent)
                g = None if labels is None else labels[near_rows]
                best[near_rows], where[near_rows] = self._search_near(
                    prepared, scaled, g, k, chunk, tile)
        else:
            scaled = ldexp(q, -self._exponent)
            best, where = self._search_near(prepared, scaled, labels, k, chunk, tile)
        return self._unscale(best, exponents, squared), where

    def forward(self, queries: torch.Tensor, n_neighbors: int = 1, squared: bool = False):
        """The ``n_neighbors`` nearest bank points of each query, traceable and unchecked.

        The exportable form of :meth:`search` (see "The exportable search" in the
        class Notes): no validation, no groups, the bank scanned in chunks of
        ``forward_chunk`` rows; on realistic data the same neighbours as
        :meth:`search`, their distances exact to rounding.

        Parameters
        ----------
        queries : Tensor of shape (m, n_features)
            Cast to the bank's dtype; on the bank's device; finite (not checked).
        n_neighbors : int, default=1
            Neighbours per query, between 1 and ``n_samples`` (not checked); a
            Python int, fixed when the module is traced.
        squared : bool, default=False
            Return squared distances.

        Returns
        -------
        distances : Tensor of shape (m, n_neighbors)
            Euclidean (or squared) distances, ascending, in the bank's dtype.
        indices : LongTensor of shape (m, n_neighbors)
            Bank rows at those distances; the smaller index first among ties.

        Examples
        --------
        >>> import torch
        >>> index = KNNIndex(torch.tensor([[0.0], [2.0], [5.0], [2.0]]), forward_chunk=2)
        >>> index(torch.tensor([[1.8], [4.0]]), 2)  # a tie at 2.0: the smaller index first
        (tensor([[0.2000, 0.2000],
                [1.0000, 2.0000]]), tensor([[1, 3],
                [2, 1]]))
        """
        k = int(n_neighbors)
        bank = self.bank
        n_bank = self._n_bank  # a Python int: the bank's traced shape is not one
        scaled = ldexp(queries.to(bank.dtype), -self._exponent)
        centred = scaled - self.centre
        # chunk offsets that depend on the input's shape: constant folding would otherwise
        # store every chunk of the bank a second time in an exported graph
        zero = queries.shape[0] * 0
        best_r = best_i = None
        width = 0
        for start in range(0, n_bank, self.forward_chunk):
            size = min(self.forward_chunk, n_bank - start)
            top = min(k + self.forward_extra, size)
            rows = bank.narrow(0, zero + start, size)
            ranking = torch.addmm(self.sq_norms.narrow(0, zero + start, size), centred,
                                  rows.T, alpha=-2.0)
            _, local = torch.topk(ranking, top, dim=1, largest=False)
            r = (scaled[:, None, :] - rows[local]).square().sum(-1)  # exact, (m, top)
            idx = local + start
            if best_r is not None:
                r, idx = torch.cat([best_r, r], 1), torch.cat([best_i, idx], 1)
            width = min(k, width + top)
            best_r, best_i = _smallest(r, idx, width)
        if squared:
            return ldexp(best_r, 2 * self._exponent), best_i
        return ldexp(best_r.sqrt(), self._exponent), best_i

    def bank_rows(self, indices: torch.Tensor) -> torch.Tensor:
        """Rows of the bank, in the caller's units, traceable and unchecked.

        Parameters
        ----------
        indices : LongTensor of any shape
            Bank rows, in ``[0, n_samples)`` (not checked).

        Returns
        -------
        Tensor of shape (*indices.shape, n_features)
            The bank's points at ``indices``, in its working dtype (the stored rows
            scaled back exactly).

        Examples
        --------
        >>> import torch
        >>> KNNIndex(torch.tensor([[0.0, 8.0], [3.0, 4.0]])).bank_rows(torch.tensor([1, 1]))
        tensor([[3., 4.],
                [3., 4.]])
        """
        return ldexp(self.bank[indices], self._exponent)

    def _prune_space(self, prepared: _Prepared) -> _Pruning | None:
        """The pruning projection of the bank in ``prepared``'s dtype (built once), or
        None where it would not save work (few leading axes do not hold the variance)."""
        key = (prepared.bank.dtype, prepared.bank.device, self.bank.dtype)
        if key in self._pruning:
            return self._pruning[key]
        dtype, d = prepared.bank.dtype, prepared.bank.shape[1]
        centred = prepared.centred.double()
        values, vectors = torch.linalg.eigh(centred.T @ centred)
        values, vectors = values.flip(0).clamp_(min=0), vectors.flip(1)
        share = values.cumsum(0) / values.sum().clamp(min=torch.finfo(torch.float64).tiny)
        p = int(torch.searchsorted(share, torch.tensor(_PRUNE_VARIANCE, dtype=share.dtype,
                                                       device=share.device))) + 1
        width = -(-(p + 1) // 16) * 16  # p axes and the residual: 64-byte rows in float32
        pruning = None
        if width <= d // 2:
            basis = vectors[:, : width - 1].to(dtype).double()  # exact in the working dtype
            gram = basis.T @ basis
            gram.diagonal().sub_(1)
            delta = float(torch.linalg.matrix_norm(gram)) * (1 + 1e-6) + 1e-15
            lower = _lower_rows(centred, basis, dtype)
            sq_norms = lower.square().sum(1)
            pruning = _Pruning(basis, _Prepared(lower, lower.new_zeros(width), lower,
                                                sq_norms, float(sq_norms.max().sqrt())),
                               delta)
        self._pruning[key] = pruning
        return pruning

    def _search_pruned(self, prepared: _Prepared, pruning: _Pruning, scaled, k, chunk,
                       tile):
        """(r, idx) as :meth:`_search_near` gives them, with candidates from a lower bound
        in a space of few dimensions (see "Pruning" in the class Notes)."""
        n_features, dtype = prepared.bank.shape[1], scaled.dtype
        finfo = torch.finfo(dtype)
        eps, tiny = finfo.eps, finfo.tiny
        width, delta = pruning.basis.shape[1] + 1, pruning.delta
        factor = (2 * (width + 16) * eps + 4 * _input_roundoff(dtype, scaled.device)
                  + 4 * delta)
        rho = (n_features + 8) * eps
        if max(factor, rho) >= 0.5:  # the bound says nothing: the plain search
            return None
        top = k + _PRUNE_EXTRA
        centred = scaled - prepared.centre
        lower = _lower_rows(centred, pruning.basis, dtype)
        approx, cand, _ = self._candidates(pruning.lower, lower, None, top, chunk, tile)
        best, where = self._exact_candidates(prepared, scaled, approx, cand, k)
        norms = centred.square().sum(1).sqrt_()
        span = ((norms + prepared.max_norm) * (1 + delta + 4 * eps)).square_()
        err = factor * span + 4 * (width + 8) * tiny
        floor = (approx[:, top - 1] - err) / (1 + delta) * (1 - rho) - n_features * tiny
        complete = floor * (1 - 16 * eps) > best[:, k - 1]
        if bool(complete.all()):
            return best, where
        rest = (~complete).nonzero()[:, 0]
        best[rest], where[rest] = self._search_near(prepared, scaled[rest], None, k, chunk,
                                                    tile, prune=False)
        return best, where

    def _search_near(self, prepared: _Prepared, scaled, labels, k, chunk, tile, *,
                     prune=True):
        """(r, idx) of queries in the bank's scale: candidates by GEMM, then exact."""
        n_bank, n_features = prepared.bank.shape
        dtype, m = scaled.dtype, scaled.shape[0]
        if (prune and labels is None and n_bank >= _PRUNE_MIN_BANK
                and m >= _PRUNE_MIN_QUERIES and k + _PRUNE_EXTRA < n_bank
                and scaled.device.type in ("cpu", "cuda")):  # float64 there
            pruning = self._prune_space(prepared)
            if pruning is not None:
                found = self._search_pruned(prepared, pruning, scaled, k, chunk, tile)
                if found is not None:
                    return found
        top = min(k + _EXTRA, n_bank)
        approx, cand, q_sq = self._candidates(prepared, scaled, labels, top, chunk, tile)
        if top == n_bank:
            complete = torch.ones(m, dtype=torch.bool, device=scaled.device)
        else:
            finfo = torch.finfo(dtype)
            eps, tiny = finfo.eps, finfo.tiny
            factor = (n_features + 8) * eps + 4 * _input_roundoff(dtype, scaled.device)
            rho = (n_features + 8) * eps
            if max(factor, rho) >= 0.5:  # the bound says nothing: search exhaustively
                complete = torch.zeros(m, dtype=torch.bool, device=scaled.device)
            else:
                bound = factor * (q_sq.sqrt() + prepared.max_norm).square()
                bound += 4 * (n_features + 8) * tiny
                slack = n_features * tiny
                theta = ((approx[:, k - 1] + bound) * (1 + rho) + 2 * slack) / (1 - rho)
                theta = (theta + bound) * (1 + 16 * eps)
                complete = approx[:, top - 1] > theta
        if bool(complete.all()):  # the usual case: no gathers
            return self._exact_candidates(prepared, scaled, approx, cand, k)
        best = torch.empty(m, k, dtype=dtype, device=scaled.device)
        where = torch.empty(m, k, dtype=torch.long, device=scaled.device)
        done = complete.nonzero()[:, 0]
        if done.numel():
            best[done], where[done] = self._exact_candidates(
                prepared, scaled.index_select(0, done), approx[done], cand[done], k)
        rest = (~complete).nonzero()[:, 0]
        if rest.numel():
            g = None if labels is None else labels[rest]
            best[rest], where[rest] = self._exhaustive(prepared.bank, scaled[rest], g, k)
        return best, where

    def _exact_candidates(self, prepared: _Prepared, scaled, approx, cand, k):
        """(r, idx): the k best candidates by exact distance, then index."""
        invalid = ~torch.isfinite(approx)  # placeholders and excluded rows
        r = self._candidate_sq(scaled, prepared.bank, cand.masked_fill(invalid, 0))
        return _select(r.masked_fill_(invalid, math.inf), cand, k)

    def _candidates(self, prepared: _Prepared, scaled, labels, top, chunk, tile):
        """The ``top`` smallest approximate squared distances by blocked GEMM."""
        n_bank = prepared.bank.shape[0]
        m, dtype, device = scaled.shape[0], scaled.dtype, scaled.device
        values = torch.empty(m, top, dtype=dtype, device=device)
        indices = torch.empty(m, top, dtype=torch.long, device=device)
        q_sq = torch.empty(m, dtype=dtype, device=device)
        # columns padded to whole groups of the candidates' selection, the pad +inf
        padded = -(-tile // _GROUP) * _GROUP
        block = torch.empty(min(chunk, m), padded, dtype=dtype, device=device)
        for start in range(0, m, chunk):
            q = scaled[start : start + chunk] - prepared.centre
            rows = q.shape[0]
            found = (values[start : start + rows], indices[start : start + rows])
            own = None if labels is None else labels[start : start + rows, None]
            for j in range(0, n_bank, tile):
                b = prepared.centred[j : j + tile]
                width = b.shape[0]
                partial = torch.addmm(prepared.sq_norms[j : j + tile], q, b.T, alpha=-2.0,
                                      out=block[:rows, :width])
                if own is not None:
                    partial.masked_fill_(own == self.bank_groups[j : j + tile], math.inf)
                whole = min(padded, -(-width // _GROUP) * _GROUP)
                if whole > width and whole // _GROUP >= 4 * top:
                    block[:rows, width:whole].fill_(math.inf)
                    partial = block[:rows, :whole]
                _merge(partial, j, top, found, first=j == 0)
            torch.sum(torch.square(q), 1, out=q_sq[start : start + rows])
            found[0].add_(q_sq[start : start + rows, None])
        return values, indices, q_sq

    def _candidate_sq(self, queries, bank, candidates) -> torch.Tensor:
        """``sum((queries[i] - bank[candidates[i, j]])**2)``, (m, top), shape-stable.

        Every sum is taken over a block of exactly ``self._rows`` differences (the rest
        of the last block zeros), so each value depends on its two rows only.
        """
        m, top = candidates.shape
        rows, d = self._rows, bank.shape[1]
        per = max(1, rows // top)  # queries per block
        buf = bank.new_zeros(rows, d)
        pairs = buf[: per * top].view(per, top, d)
        gathered = bank.new_empty(per * top, d)
        out = bank.new_empty(m, top)
        for start in range(0, m, per):
            n = min(per, m - start)
            picked = torch.index_select(bank, 0, candidates[start : start + n].reshape(-1),
                                        out=gathered[: n * top])
            torch.sub(queries[start : start + n, None], picked.view(n, top, d), out=pairs[:n])
            if n < per:
                pairs[n:].zero_()
            out[start : start + n] = _block_sq_sums(buf)[: n * top].view(n, top)
        return out

    def _exhaustive(self, bank, scaled, labels, k):
        """(r, idx): every bank row's exact distance, the k best by (distance, index).

        The sums are taken over blocks of exactly ``self._rows`` differences, as in
        :meth:`_candidate_sq`, so both give the same value for the same two rows.
        """
        n_bank, d = bank.shape
        m, rows = scaled.shape[0], self._rows
        best = bank.new_empty(m, k)
        where = torch.empty(m, k, dtype=torch.long, device=bank.device)
        buf = bank.new_zeros(rows, d)
        per = rows // n_bank  # queries per block, when the bank fits in one
        for start in range(0, m, max(1, per)):
            if per:
                n = min(per, m - start)
                pairs = buf[: per * n_bank].view(per, n_bank, d)
                torch.sub(scaled[start : start + n, None], bank, out=pairs[:n])
                if n < per:
                    pairs[n:].zero_()
                r = _block_sq_sums(buf)[: n * n_bank].view(n, n_bank)
            else:
                n = 1
                r = bank.new_empty(1, n_bank)
                for j in range(0, n_bank, rows):
                    t = min(rows, n_bank - j)
                    torch.sub(scaled[start : start + 1], bank[j : j + t], out=buf[:t])
                    if t < rows:
                        buf[t:].zero_()
                    r[0, j : j + t] = _block_sq_sums(buf)[:t]
            if labels is not None:
                r.masked_fill_(labels[start : start + n, None] == self.bank_groups, math.inf)
            r, order = torch.sort(r, dim=1, stable=True)  # ties: smaller index first
            best[start : start + n], where[start : start + n] = r[:, :k], order[:, :k]
        return best, where

    def _unscale(self, r, exponents, squared: bool) -> torch.Tensor:
        """Squared distances ``r`` in the scaled units back to the caller's units."""
        if exponents is None and self._exponent == 0:
            out = r if squared else r.sqrt()  # r is already a fresh tensor
        elif exponents is None:
            out = ldexp(r, 2 * self._exponent) if squared else ldexp(r.sqrt(), self._exponent)
        else:
            e = exponents[:, None]
            out = ldexp(r, 2 * e) if squared else ldexp(r.sqrt(), e)
        if not all_finite(out):
            what = "squared distances" if squared else "distances"
            hint = "squared=False or float64 input" if squared else "float64 input"
            raise ValueError(f"{what} exceed the range of {out.dtype} (largest "
                             f"{torch.finfo(out.dtype).max:.3g}); use {hint}")
        return out


def _lower_rows(centred: torch.Tensor, basis: torch.Tensor, dtype) -> torch.Tensor:
    """``[x V, sqrt(max(|x|^2 - |x V|^2, 0))]`` of rows ``x``, computed in float64 and
    rounded to ``dtype``: the leading axes and the norm of the rest, whose distances
    bound the full ones from below. In blocks of rows, so that the float64
    temporaries stay in cache."""
    out = torch.empty(centred.shape[0], basis.shape[1] + 1, dtype=dtype,
                      device=centred.device)
    for start in range(0, centred.shape[0], _PRUNE_BLOCK):
        x = centred[start : start + _PRUNE_BLOCK].double()
        projected = x @ basis
        rest = (x.square().sum(1) - projected.square().sum(1)).clamp_(min=0).sqrt_()
        out[start : start + _PRUNE_BLOCK, :-1] = projected
        out[start : start + _PRUNE_BLOCK, -1] = rest
    return out


def _block_sq_sums(buf: torch.Tensor) -> torch.Tensor:
    """Row sums of squares of a (rows, d) block of differences, squared in place.

    The one reduction behind every distance :class:`KNNIndex` returns: always on a
    contiguous block of the index's fixed shape, whatever the batch.
    """
    return torch.sum(buf.square_(), 1)


def _select(r: torch.Tensor, indices: torch.Tensor, k: int):
    """The ``k`` smallest of each row of ``r`` by (value, index), ascending."""
    indices, order = torch.sort(indices, dim=1)
    r, pick = torch.sort(r.gather(1, order), dim=1, stable=True)
    return r[:, :k], indices.gather(1, pick[:, :k])


def _smallest(r: torch.Tensor, indices: torch.Tensor, k: int):
    """The ``k`` smallest of each row of ``r`` by (value, index), ascending; traceable.

    ``indices`` are distinct along each row. Each entry's rank is counted by
    comparisons (no sort: torch's sorts are not stable under tracing and export),
    and the entries of ranks ``0 .. k-1`` are placed by a one-hot sum (exact: one
    term each).
    """
    before = (r[:, None, :] < r[:, :, None]) | (
        (r[:, None, :] == r[:, :, None]) & (indices[:, None, :] < indices[:, :, None]))
    rank = before.sum(2)  # (m, w): entries ahead of each one
    hit = rank[:, :, None] == torch.arange(k, device=r.device)  # (m, w, k)
    values = torch.where(hit, r[:, :, None], torch.zeros_like(r[:, :1, None])).sum(1)
    where = torch.where(hit, indices[:, :, None], torch.zeros_like(indices[:, :1, None])).sum(1)
    return values, where


def _block_smallest(block: torch.Tensor, k: int):
    """The ``min(k, width)`` smallest values of each row of ``block`` and their columns,
    ascending; which of several tied values is kept is unspecified.

    Rows of whole groups of ``_GROUP`` columns, at least ``4 k`` of them, go through
    the groups' minima: the k smallest values of a row lie in the k groups of smallest
    minimum (any other value is at least those k minima), so one pass of minima and two
    small selections replace a selection over the whole row (2-4x faster than
    :func:`torch.topk` on 4,096 columns).
    """
    rows, width = block.shape
    groups = width // _GROUP
    if width % _GROUP or groups < 4 * k:
        if k == 1:  # a plain reduction is markedly faster than topk
            return torch.min(block, 1, keepdim=True)
        return torch.topk(block, min(k, width), largest=False)
    minima = block.view(rows, groups, _GROUP).amin(2)
    if k == 1:
        chosen = torch.argmin(minima, 1, keepdim=True)
    else:
        chosen = torch.topk(minima, k, largest=False, sorted=False)[1]
    columns = (chosen[:, :, None] * _GROUP
               + torch.arange(_GROUP, device=block.device)).view(rows, k * _GROUP)
    pool = block.gather(1, columns)
    if k == 1:
        value, pick = torch.min(pool, 1, keepdim=True)
    else:
        value, pick = torch.topk(pool, k, largest=False)
    return value, columns.gather(1, pick)


def _merge(partial: torch.Tensor, offset: int, k: int, found, *, first: bool) -> None:
    """Fold a block of partial distances (bank rows from ``offset``) into ``found``.

    Keeps the ``k`` smallest values seen (as a multiset), ascending; which of
    several tied values is kept does not matter to the caller.
    """
    best, where = found
    value, index = _block_smallest(partial, k)
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
    dtype = torch.promote_types(working_dtype(x.dtype), working_dtype(y.dtype))
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
        ``|x_i - y_j|^2``, clamped at zero, in the promoted dtype of the inputs
        (float16 and bfloat16 give float32). Empty when ``m`` or ``n`` is 0; zero
        when ``n_features`` is 0.

    Raises
    ------
    TypeError
        If an input is not a tensor.
    ValueError
        If an input is not 2-D or holds NaN or infinity, the widths differ, the
        inputs are on different devices, or the squared distances exceed the
        range of the dtype (float64 input gives them).

    Notes
    -----
    One matrix product on inputs scaled by a common power of two (the largest
    absolute entry to [0.5, 1), exactly) and centred on the mean of ``y``; the
    rounding error is about ``eps * (|x_i - mean|^2 + |y_j - mean|^2)``, as for
    scikit-learn's :func:`~sklearn.metrics.pairwise.euclidean_distances` in
    float64. Use :class:`KNNIndex` for distances exact to rounding and
    independent of the batch.

    Examples
    --------
    >>> import torch
    >>> pairwise_sq_distances(torch.tensor([[0.0, 0.0], [1.0, 1.0]]), torch.tensor([[3.0, 4.0]]))
    tensor([[25.],
            [13.]])
    """
    x, y = _check_pair(x, y, "x", "y")
    if x.shape[0] == 0 or y.shape[0] == 0 or x.shape[1] == 0:
        return x.new_zeros(x.shape[0], y.shape[0])
    e = int(frexp_exponent(torch.maximum(x.abs().amax(), y.abs().amax())))
    x, y = ldexp(x, -e), ldexp(y, -e)
    shift = y.mean(0)
    x, y = x - shift, y - shift
    out = torch.addmm(y.square().sum(1), x, y.T, alpha=-2.0)
    out = ldexp(out.add_(x.square().sum(1)[:, None]).clamp_(min=0.0), 2 * e)
    if not all_finite(out):
        raise range_error("squared distances", out.dtype)
    return out


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
        promoted dtype of the inputs (float16 and bfloat16 give float32).
    indices : LongTensor of shape (m, n_neighbors)
        Rows of ``bank`` at those distances; among equal distances the smaller
        index comes first.

    Raises
    ------
    TypeError
        If an input is not a tensor, or ``n_neighbors`` or ``chunk_size`` is not an int.
    ValueError
        If an input is not 2-D or holds NaN or infinity, the widths differ, the
        inputs are on different devices, the bank is empty, ``n_neighbors``
        exceeds the bank size, ``n_neighbors`` or ``chunk_size`` is below 1, or
        the distances exceed the range of the dtype.

    See Also
    --------
    KNNIndex : the same search with the bank prepared once, for repeated queries
        (its Notes give the algorithm and its error bound).

    Notes
    -----
    Equivalent to ``KNNIndex(bank).search(queries, ...)``: candidates by blocked
    matrix products, distances recomputed exactly from the differences, the
    result independent of the batch. Results equal
    :class:`sklearn.neighbors.NearestNeighbors` up to rounding.

    Examples
    --------
    >>> import torch
    >>> bank = torch.tensor([[0.0, 0.0], [3.0, 4.0], [1.0, 0.0]])
    >>> knn_distances(torch.tensor([[0.0, 0.5]]), bank, n_neighbors=2)
    (tensor([[0.5000, 1.1180]]), tensor([[0, 2]]))
    """
    queries, bank = as_float_tensor(queries, "queries"), as_float_tensor(bank, "bank")
    # the bank is promoted before it is scaled; KNNIndex and search validate each side once
    bank = bank.to(torch.promote_types(working_dtype(queries.dtype), bank.dtype))
    return KNNIndex(bank).search(queries, n_neighbors, squared=squared, chunk_size=chunk_size)
