"""Covariance with :func:`numpy.cov` semantics and a mergeable streaming moment accumulator."""

from __future__ import annotations

import operator

import numpy as np
import torch

from ._packing import PackedMatrices
from ._validation import all_finite, as_float_tensor, check_finite, ldexp, working_dtype

__all__ = ["cov", "MomentAccumulator"]


def accumulation_dtype(device: torch.device) -> torch.dtype:
    """float64, except on Apple MPS, which has no float64 (float32 there)."""
    return torch.float32 if device.type == "mps" else torch.float64


# binary exponents within which data are squared and summed in the accumulation dtype
# as they are; beyond, they are first divided by an exact power of two
_PLAIN_EXPONENT = {torch.float64: 400, torch.float32: 40}


def _observations(a: torch.Tensor, rowvar: bool, name: str) -> torch.Tensor:
    """View ``a`` (0-, 1- or 2-D) as an (n_observations, n_variables) matrix."""
    if a.ndim > 2:
        raise ValueError(f"{name} has more than 2 dimensions (shape {tuple(a.shape)})")
    if a.ndim < 2:
        return a.reshape(-1, 1)
    return a.mT if rowvar else a


def _check_weights(w, n: int, name: str, device: torch.device, dtype: torch.dtype):
    """Return 1-D non-negative finite weights with ``dtype`` on ``device``."""
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(w).__name__}")
    if w.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(w.shape)}")
    if w.shape[0] != n:
        raise ValueError(f"incompatible numbers of samples ({n}) and {name} ({w.shape[0]})")
    w = check_finite(w.to(device=device, dtype=dtype), name)
    if bool((w < 0).any()):
        raise ValueError(f"{name} cannot be negative")
    return w


_BLAS_BLOCK_BYTES = 8 * 2**20  # rows of centred data per symmetric rank-k update
#: ``n d^2`` below which the scatter is torch's own product, not scipy's BLAS: a small
#: update costs less than the hand-over between torch's thread pool and BLAS's, whose
#: threads spin against each other on 2 cores (a stream of 512 x 128 batches spent 3 ms
#: per batch in a 0.1 ms ``syrk`` and 1.5 ms in a 128 x 128 ``triu``).
_BLAS_MIN_WORK = 2**25


def _scatter_torch(x: torch.Tensor, mean: torch.Tensor, scale=None) -> torch.Tensor:
    """``sum_i scale_i^2 (x_i - mean)(x_i - mean)^T`` by one GEMM, any device; exactly
    symmetric (the upper half mirrored, as the BLAS path gives it)."""
    xc = x - mean
    if scale is not None:
        xc.mul_(scale.unsqueeze(-1))
    upper = (xc.mT @ xc).triu_()
    return upper + upper.triu(1).mT


_RAW_SAMPLE_ROWS = 2048  # rows that decide whether the uncentred product is safe
_RAW_MAX_RATIO = 16.0  # largest mean^2 / variance of a feature for the uncentred product


def _syrk(xn: np.ndarray, c=None) -> np.ndarray | None:
    """Upper half of ``xn^T xn (+ c)`` by BLAS ``?syrk`` without copying ``xn``.

    None when ``xn`` is neither C- nor Fortran-contiguous (the caller centres blocks).
    """
    from scipy.linalg import blas

    syrk = blas.dsyrk if xn.dtype == np.float64 else blas.ssyrk
    kw = {} if c is None else {"beta": 1.0, "c": c, "overwrite_c": 1}
    if xn.flags.c_contiguous:  # xn.T is a Fortran (d, n) matrix: xn.T (xn.T)^T
        return syrk(1.0, xn.T, **kw)
    if xn.flags.f_contiguous:  # xn is a Fortran (n, d) matrix: xn^T xn
        return syrk(1.0, xn, trans=1, **kw)
    return None


def _scatter_uncentred(xn: np.ndarray, mn: np.ndarray) -> np.ndarray | None:
    """``x^T x - n mean mean^T`` (upper half), or None where it would lose accuracy.

    The uncentred product needs no centred copy of the data, but cancels where a
    feature's mean is large against its spread: its relative error grows like
    ``eps * (1 + mean^2 / variance)``. It is used only where that ratio is at most
    ``_RAW_MAX_RATIO`` (losing at most 4 bits), judged first on a sample of rows,
    then on the variances the product itself gives.
    """
    n = xn.shape[0]
    sample = xn[:_RAW_SAMPLE_ROWS] - mn
    spread = np.einsum("ij,ij->j", sample, sample) / sample.shape[0]
    with np.errstate(over="ignore", invalid="ignore"):  # huge means: not safe, and False
        square = mn * mn
        if not np.all(square <= _RAW_MAX_RATIO * spread):
            return None
        c = _syrk(xn)
        if c is None:
            return None
        c -= n * np.triu(np.outer(mn, mn))
        safe = np.all(square <= _RAW_MAX_RATIO * (np.diagonal(c) / n))
    return c if safe else None


def _scatter_blas(x: torch.Tensor, mean: torch.Tensor, scale=None) -> torch.Tensor:
    """The same on the CPU by BLAS ``?syrk``, a symmetric rank-k update (half the flops).

    torch has no symmetric rank-k update, so this calls the BLAS routine that
    ``numpy.cov`` reaches through ``numpy.dot(X, X.T)``, via scipy. Where every
    feature's mean is within 4 standard deviations of zero, it is one product of the
    uncentred data, corrected by ``n mean mean^T`` (no copy of the data). Otherwise
    blocks of about 8 MB of rows are centred by numpy into one reused buffer, which
    stays in cache and never faults in fresh pages as a full centred copy would;
    numpy rather than torch, because alternating torch's OpenMP threads with BLAS's
    own threads block after block makes them spin against each other (2x slower on
    2 cores).
    """
    xn, mn = x.numpy(), mean.numpy()
    c = None
    if scale is None and xn.dtype == mn.dtype:
        c = _scatter_uncentred(xn, mn)
    if c is None:
        sn = None if scale is None else scale.numpy()
        n, d = xn.shape
        rows = max(256, _BLAS_BLOCK_BYTES // (d * mn.itemsize))
        buf = np.empty((min(rows, n), d), dtype=mn.dtype)
        for start in range(0, n, rows):
            block = buf[: min(rows, n - start)]
            np.subtract(xn[start : start + rows], mn, out=block)
            if sn is not None:
                block *= sn[start : start + rows, None]
            c = _syrk(block, c)
    # symmetrised by numpy too: a torch operation right after BLAS meets its spinning
    # threads
    upper = np.triu(c)
    upper += np.triu(upper, 1).T
    return torch.from_numpy(upper)


def _scatter(x: torch.Tensor, mean: torch.Tensor, scale=None) -> torch.Tensor:
    """Centred (weighted) scatter of the rows of a 2-D ``x``, in ``mean``'s dtype."""
    floating = (torch.float32, torch.float64)
    if (x.device.type == "cpu" and not x.requires_grad
            and x.shape[0] * x.shape[-1] ** 2 >= _BLAS_MIN_WORK
            and x.dtype in floating and mean.dtype in floating):
        return _scatter_blas(x, mean, scale)
    return _scatter_torch(x, mean, scale)


def cov(m, y=None, rowvar=True, bias=False, ddof=None, fweights=None, aweights=None, *,
        dtype=None):
    """Estimate a covariance matrix exactly as :func:`numpy.cov` does, in PyTorch.

    Parameters
    ----------
    m : Tensor of shape (n_variables, n_observations), (n_observations,) or ()
        Data: each row is a variable and each column an observation (transposed when
        ``rowvar`` is False). A 1-D tensor is a single variable. Integer and boolean
        tensors are promoted (see ``dtype``).
    y : Tensor, optional
        Additional variables, laid out like ``m`` and with the same number of
        observations; they are stacked after the variables of ``m``.
    rowvar : bool, default=True
        If True, rows are variables and columns observations; otherwise the reverse.
        Ignored for 1-D input.
    bias : bool, default=False
        Normalise by ``N`` (True) instead of ``N - 1`` (False). Overridden by ``ddof``.
    ddof : int, optional
        Delta degrees of freedom: normalise by ``N - ddof``. Overrides ``bias``.
    fweights : Tensor of shape (n_observations,), optional
        Integer-valued, non-negative frequency weights (repeat counts).
    aweights : Tensor of shape (n_observations,), optional
        Non-negative observation (reliability) weights.
    dtype : torch.dtype, optional
        Dtype of the data and of the result. By default floating inputs keep their dtype
        (promoted between ``m`` and ``y``; float16 and bfloat16 give a float32 result,
        their range is too small for products) and integer or boolean inputs become
        ``torch.get_default_dtype()``: torch's rule, not numpy's (which gives float64).

    Returns
    -------
    Tensor of shape (n_variables, n_variables)
        The covariance matrix on the device of ``m``, 0-D for a single variable (numpy
        squeezes it too) and of shape (0, 0) when there are no variables.

    Raises
    ------
    TypeError
        If ``m``, ``y`` or a weight is not a tensor, if ``m`` or ``y`` is complex, or if
        ``dtype`` is not a floating dtype.
    ValueError
        If ``m`` or ``y`` has more than 2 dimensions or holds NaN or infinity, if ``y``
        has a different number of observations, if ``ddof`` is not an integer, if a
        weight vector is not 1-D, has the wrong length, is negative or not finite, if
        ``fweights`` are not integer-valued, if the weights sum to zero or beyond the
        range of float64, if the normalisation ``N - ddof`` (or its weighted form) is not
        positive (for instance a single observation with ``ddof=1``, where numpy warns and
        returns ``inf`` or ``nan``), or if the covariance exceeds the range of the result
        dtype.

    See Also
    --------
    MomentAccumulator : The same estimate from streamed or parallel batches.

    Notes
    -----
    Follows ``numpy.cov`` (numpy 2.x) including the normalisation with both weights,
    ``N_w - ddof * sum(w * a) / N_w``. Deviations: NaN/inf input raises instead of
    propagating, and so does a normalisation ``<= 0`` (numpy warns and returns inf or
    nan); errors numpy reports as ``TypeError``/``RuntimeError`` for weights are
    ``ValueError`` here; and a 2-D ``y`` of shape (1, k) with ``rowvar=False`` is one
    observation of ``k`` variables, like ``m`` (numpy alone treats such a ``y`` as one
    variable).

    The data are centred on their (weighted) mean and the scatter is ``Xc^T Xc``
    (weights enter as ``sqrt(w)`` row scaling), accumulated in float64 (float32 on MPS)
    and cast to the result dtype: ``O(n_observations * n_variables**2)`` time. On the CPU
    it is a BLAS symmetric rank-k update (``dsyrk``, through scipy, as numpy reaches it)
    over blocks of about 8 MB of centred rows; elsewhere a single GEMM over one centred
    copy of the data. The result is symmetrised exactly. Data beyond ``2**+-400``
    (``2**+-40`` on MPS) are first divided by an exact power of two and the covariance
    multiplied back, so squares neither overflow nor underflow on the way.

    Examples
    --------
    >>> import torch
    >>> from skanomaly.functional import cov
    >>> x = torch.tensor([[0.0, 2.0], [1.0, 1.0], [2.0, 0.0]]).T
    >>> cov(x)
    tensor([[ 1., -1.],
            [-1.,  1.]])
    >>> cov(torch.tensor([1.0, 2.0, 4.0]), bias=True)
    tensor(1.5556)
    """
    if ddof is not None:
        if ddof != int(ddof):
            raise ValueError(f"ddof must be integer, got {ddof!r}")
        ddof = int(ddof)
    else:
        ddof = 0 if bias else 1
    if dtype is not None and not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating dtype, got {dtype}")
    m = as_float_tensor(m, "m", dtype)
    if y is not None:
        y = as_float_tensor(y, "y", dtype)
        if dtype is None:
            out_dtype = torch.promote_types(m.dtype, y.dtype)
            m, y = m.to(out_dtype), y.to(out_dtype)
    out_dtype = working_dtype(m.dtype) if dtype is None else dtype
    x = xm = _observations(m, rowvar, "m")
    if x.shape[1] == 0:
        return torch.empty((0, 0), dtype=out_dtype, device=m.device)
    if y is not None:
        yo = _observations(y, rowvar, "y")
        if yo.shape[0] != x.shape[0]:
            raise ValueError(f"m has {x.shape[0]} observation(s) but y has {yo.shape[0]}")
        x = torch.cat((x, yo), dim=1)
    n, acc = x.shape[0], accumulation_dtype(x.device)

    w = None
    if fweights is not None:
        w = _check_weights(fweights, n, "fweights", x.device, acc)
        if not torch.equal(w, torch.round(w)):
            raise ValueError("fweights must be integer-valued")
    if aweights is not None:
        a = _check_weights(aweights, n, "aweights", x.device, acc)
        w = a if w is None else w * a
    if w is not None and not all_finite(w.sum()):
        raise ValueError(f"the weights sum beyond the range of {acc}")

    # Far from unit scale the squares could overflow (or underflow) the accumulation
    # dtype: divide by an exact power of two first, multiply the result back.
    exponent = 0
    if n:
        peak = x.abs().amax()
        if not bool(torch.isfinite(peak)):
            check_finite(xm, "m")
            if y is not None:
                check_finite(yo, "y")
        exponent = int(torch.frexp(peak.to(acc)).exponent)
        if abs(exponent) > _PLAIN_EXPONENT.get(acc, 40):
            x = ldexp(x.to(acc), -exponent)
        else:
            exponent = 0
    if w is None:
        mean = x.mean(dim=0, dtype=acc)
    else:
        w_sum = float(w.sum())
        if w_sum == 0.0:
            raise ValueError("weights sum to zero; the weighted mean is undefined")
        mean = (w @ x.to(acc)) / w_sum
    if w is None:
        fact = n - ddof
    elif ddof == 0:
        fact = w_sum
    elif aweights is None:
        fact = w_sum - ddof
    else:
        fact = w_sum - ddof * float((w * a).sum()) / w_sum
    if not fact > 0:
        raise ValueError(
            f"degrees of freedom <= 0 ({fact:g}): {n} observation(s)"
            f"{'' if w is None else ' (weighted)'} with ddof={ddof}; the covariance is "
            "undefined (numpy.cov returns inf or nan here)")
    scatter = _scatter(x, mean) if w is None else _scatter(x, mean, w.sqrt())
    c = (scatter + scatter.mT).mul_(0.5 / fact)
    if exponent:
        c = ldexp(c, 2 * exponent)
    c = c.to(out_dtype)
    if not all_finite(c):
        raise ValueError(f"the covariance exceeds the range of {out_dtype} (largest "
                         f"{torch.finfo(out_dtype).max:.3g}); pass dtype=torch.float64")
    return c.squeeze()


class MomentAccumulator:
    """Mergeable streaming mean and covariance, accumulated in float64.

    Feed batches of observations with :meth:`update` and combine accumulators filled in
    parallel (other workers, devices or data shards) with :meth:`merge`; the result equals
    the one-shot estimate of all the data, in any split and any merge order.

    Parameters
    ----------
    n_features : int
        Number of features ``d`` of each observation.
    batch_shape : tuple of int, default=()
        Leading shape of independent problems, e.g. ``(P,)`` positions of a feature map
        for PaDiM: each position gets its own mean and covariance.
    device : str or torch.device, optional
        Device of the accumulated state. By default the state follows the device of the
        first non-empty batch.

    Attributes
    ----------
    n_features : int
        Number of features ``d``.
    batch_shape : tuple of int
        Leading shape of independent problems.

    Raises
    ------
    ValueError
        If ``n_features`` or a size in ``batch_shape`` is not positive.
    TypeError
        If ``n_features`` or a ``batch_shape`` entry is not an integer.

    See Also
    --------
    cov : One-shot covariance with numpy semantics.

    Notes
    -----
    Each batch is centred on its own mean, its centred scatter computed with one batched
    GEMM, and the batch merged with the pairwise update of Chan, Golub & LeVeque (1979):
    with counts ``n_a, n_b``, means ``mu_a, mu_b`` and ``delta = mu_b - mu_a``,
    ``M2 = M2_a + M2_b + delta delta^T n_a n_b / (n_a + n_b)``. Unlike raw sums of ``x``
    and ``x x^T``, this does not cancel catastrophically for data far from the origin.
    An update costs ``O(prod(batch_shape) * n * d**2)``; the state holds
    ``prod(batch_shape) * d * (d + 1)`` float64 numbers (float32 on MPS, which has no
    float64). The object holds plain tensors and pickles.

    References
    ----------
    T. F. Chan, G. H. Golub and R. J. LeVeque, "Updating formulae and a pairwise
    algorithm for computing sample variances", Stanford CS report STAN-CS-79-773, 1979.

    Examples
    --------
    >>> import torch
    >>> from skanomaly.functional import MomentAccumulator, cov
    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.randn(100, 3, generator=g, dtype=torch.float64)
    >>> acc = MomentAccumulator(3).update(x[:30]).update(x[30:])
    >>> acc.n_samples_
    100
    >>> torch.allclose(acc.covariance(), cov(x, rowvar=False))
    True
    >>> left, right = MomentAccumulator(3).update(x[:50]), MomentAccumulator(3).update(x[50:])
    >>> torch.allclose(left.merge(right).mean, x.mean(0))
    True
    """

    def __init__(self, n_features, batch_shape=(), *, device=None):
        self.n_features = operator.index(n_features)
        self.batch_shape = tuple(operator.index(s) for s in batch_shape)
        if self.n_features < 1:
            raise ValueError(f"n_features must be positive, got {self.n_features}")
        if any(s < 1 for s in self.batch_shape):
            raise ValueError(f"batch_shape sizes must be positive, got {self.batch_shape}")
        self._follow_input = device is None
        dev = torch.device("cpu" if device is None else device)
        dt = accumulation_dtype(dev)
        self._n = 0
        self._mean = torch.zeros(*self.batch_shape, self.n_features, dtype=dt, device=dev)
        self._m2 = torch.zeros(*self.batch_shape, self.n_features, self.n_features,
                               dtype=dt, device=dev)

    @classmethod
    def _from_moments(cls, n: int, mean: torch.Tensor, scatter: torch.Tensor):
        """An accumulator holding ``n`` observations with this mean and centred scatter.

        The tensors (float64, or float32 on MPS) become its state, not copies.
        """
        acc = cls.__new__(cls)  # no zero state to allocate and throw away
        acc.n_features, acc.batch_shape = mean.shape[-1], tuple(mean.shape[:-1])
        acc._follow_input = False
        acc._n, acc._mean, acc._m2 = int(n), mean, scatter
        return acc

    @property
    def n_samples_(self) -> int:
        """Number of observations accumulated so far (per problem of ``batch_shape``)."""
        return self._n

    @property
    def mean(self) -> torch.Tensor:
        """Mean, float64 tensor of shape (batch_shape..., n_features) (a copy)."""
        return self._mean.clone()

    @property
    def scatter(self) -> torch.Tensor:
        """Centred scatter ``sum (x - mean)(x - mean)^T``, shape (batch_shape..., d, d).

        The accumulator's own float64 buffer, not a copy: clone it before modifying.
        """
        return self._m2

    def to(self, device) -> MomentAccumulator:
        """Move the state to ``device`` in place; later batches are moved there too.

        Parameters
        ----------
        device : str or torch.device
            Target device.

        Returns
        -------
        MomentAccumulator
            This accumulator, for chaining.
        """
        self._move(torch.device(device))
        self._follow_input = False
        return self

    def __getstate__(self):
        # the scatter is symmetric: pickled as its lower triangle (the one a Cholesky
        # factorisation reads) plus the entries that differ from its mirror, exactly
        state = self.__dict__.copy()
        if self._m2.device.type == "cpu":
            state["_m2"] = PackedMatrices(self._m2, "lower", "mirror")
        return state

    def __setstate__(self, state):
        self.__dict__.update(PackedMatrices.unwrap(state))

    def _move(self, device: torch.device) -> None:
        dt = accumulation_dtype(device)
        self._mean, self._m2 = self._mean.to(device, dt), self._m2.to(device, dt)

    def covariance(self, ddof: int = 1) -> torch.Tensor:
        """Covariance ``scatter / (n_samples_ - ddof)``.

        Parameters
        ----------
        ddof : int, default=1
            Delta degrees of freedom (1: unbiased, 0: maximum likelihood).

        Returns
        -------
        Tensor of shape (batch_shape..., n_features, n_features), float64
            A new tensor on the accumulator's device.

        Raises
        ------
        ValueError
            If ``n_samples_ - ddof <= 0`` (too few samples).
        """
        if self._n - ddof <= 0:
            raise ValueError(f"covariance needs more than ddof={ddof} sample(s), "
                             f"got {self._n}")
        return self._m2 / (self._n - ddof)

    def update(self, x) -> MomentAccumulator:
        """Add a batch of observations.

        Parameters
        ----------
        x : Tensor of shape (batch_shape..., n, n_features)
            ``n`` observations along dimension -2; any real dtype, any device (moved to
            the accumulator's device). An empty batch (``n == 0``) is a no-op.

        Returns
        -------
        MomentAccumulator
            This accumulator, for chaining.

        Raises
        ------
        TypeError
            If ``x`` is not a real tensor.
        ValueError
            If ``x`` has the wrong shape or holds NaN or infinity, or if its sums of
            squares overflow the accumulation dtype (float64: values beyond about
            ``1e154``); the accumulator is then left unchanged.
        """
        x = as_float_tensor(x, "x")
        want = (*self.batch_shape, "n", self.n_features)
        if x.ndim != len(want) or tuple(x.shape[:-2]) != self.batch_shape \
                or x.shape[-1] != self.n_features:
            raise ValueError(f"x must have shape {want}, got {tuple(x.shape)}")
        check_finite(x, "x")
        nb = x.shape[-2]
        if nb == 0:
            return self
        if self._n == 0 and self._follow_input:
            self._move(x.device)
        x = x.to(self._mean.device)
        mean_b = x.mean(dim=-2, dtype=self._mean.dtype)
        if self.batch_shape:
            m2_b = _scatter_torch(x, mean_b.unsqueeze(-2))
        else:
            m2_b = _scatter(x, mean_b)
        if not (all_finite(mean_b) and all_finite(m2_b)):
            raise ValueError(
                f"the sums of x (values up to {float(x.abs().amax()):.3g}) and of its squares "
                f"overflow {self._mean.dtype}; rescale the data")
        self._combine(nb, mean_b, m2_b)
        return self

    def merge(self, other: MomentAccumulator) -> MomentAccumulator:
        """Add the observations accumulated by ``other`` (which is left unchanged).

        Parameters
        ----------
        other : MomentAccumulator
            An accumulator with the same ``n_features`` and ``batch_shape``.

        Returns
        -------
        MomentAccumulator
            This accumulator, for chaining.

        Raises
        ------
        TypeError
            If ``other`` is not a MomentAccumulator.
        ValueError
            If ``other`` has a different ``n_features`` or ``batch_shape``, or the merged
            moments overflow (the accumulator is then left unchanged).
        """
        if not isinstance(other, MomentAccumulator):
            raise TypeError(f"can only merge a MomentAccumulator, got {type(other).__name__}")
        if (other.n_features, other.batch_shape) != (self.n_features, self.batch_shape):
            raise ValueError(
                "cannot merge accumulators of different shapes: "
                f"n_features={self.n_features}, batch_shape={self.batch_shape} vs "
                f"n_features={other.n_features}, batch_shape={other.batch_shape}")
        if other._n == 0:
            return self
        if self._n == 0 and self._follow_input:
            self._move(other._mean.device)
        dev, dt = self._mean.device, self._mean.dtype
        self._combine(other._n, other._mean.to(dev, dt, copy=True),
                      other._m2.to(dev, dt, copy=True))
        return self

    def _combine(self, nb: int, mean_b: torch.Tensor, m2_b: torch.Tensor) -> None:
        """Chan et al. pairwise update with a batch's count, mean and centred scatter.

        ``m2_b`` must be a tensor this accumulator owns: it becomes the new state.
        """
        n = self._n + nb
        if self._n:
            d = self.n_features
            delta = mean_b - self._mean
            m2_b.add_(self._m2).view(-1, d, d).baddbmm_(
                delta.reshape(-1, d, 1), delta.reshape(-1, 1, d), alpha=self._n * nb / n)
            mean_b = self._mean + delta * (nb / n)
            if not (all_finite(mean_b) and all_finite(m2_b)):  # the state stays as it was
                raise ValueError(f"the merged moments overflow {m2_b.dtype}; rescale the data")
        self._m2, self._mean, self._n = m2_b, mean_b, n
