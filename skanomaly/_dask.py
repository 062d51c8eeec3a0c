"""Fitting and scoring on Dask arrays without gathering them (private).

``BaseDetector.fit``, ``score_samples`` and ``anomaly_map`` and
``FeatureExtractor.fit``/``transform`` hand a :class:`dask.array.Array` to the functions
here. dask is imported only when one is called, so ``import skanomaly`` does not import
it.

Fitting. The array is rechunked so that its blocks split only the sample axis. Each
block is fitted on a worker by a clone of the detector (its ``_fit``: the partial state
that ``partial_fit`` keeps: moments, a coreset, a reservoir); the states are reduced
pairwise in a binary tree of tasks by each detector's ``_merge_partial``, which reuses
``partial_fit``'s merge (Chan et al.'s moment update, merge-and-reduce coresets, ...).
Only states travel between tasks and to the client, never the blocks. The tasks run on
the current :class:`distributed.Client` if there is one, else on dask's default
scheduler.

Threshold, in a second pass over the blocks (``calibration_`` records which):

- ``"leave-one-out"`` (Gaussian, PaDiM): each block's exact leave-one-out scores under
  the final moments, as ``fit`` computes them;
- ``"leave-one-image-out"`` (PatchCore): each block scored by the final bank without the
  entries of its own images (patch and image numbers are global);
- ``"cross-fit"`` (DFM, DFKDE, and the others when the above is not available): the
  blocks are grouped into ``K = min(5, n_blocks)`` consecutive folds and each block is
  scored by the merge of the other folds' states.

The scores, one float per sample, come to the client, where ``offset_`` is their
``contamination`` quantile.
"""

from __future__ import annotations

import copy
import math
import sys
import warnings
from numbers import Integral

import numpy as np
import torch

__all__: list = []  # private module


def is_dask_array(X) -> bool:
    """Whether ``X`` is a :class:`dask.array.Array` (without importing dask).

    Examples
    --------
    >>> import numpy as np
    >>> from skanomaly._dask import is_dask_array
    >>> is_dask_array(np.zeros(3))
    False
    """
    da = sys.modules.get("dask.array")
    return da is not None and isinstance(X, da.Array)


def _scheduler():
    """The current ``distributed`` client, or None for dask's default scheduler."""
    try:
        from distributed import default_client

        return default_client()
    except (ImportError, ValueError):
        return None


def _by_samples(X, min_rows: int = 1):
    """``X`` rechunked so that blocks split only the sample axis, each ``>= min_rows``."""
    if X.ndim < 1 or any(math.isnan(c) for c in X.chunks[0]):
        raise ValueError(f"a dask array of known chunk sizes along the sample axis is "
                         f"needed, got {X!r} (call X.compute_chunk_sizes() first)")
    merged = []
    for size in X.chunks[0]:
        if merged and merged[-1] < min_rows:
            merged[-1] += size
        else:
            merged.append(size)
    if len(merged) > 1 and merged[-1] < min_rows:
        last = merged.pop()
        merged[-1] += last
    chunks = (tuple(merged),) + tuple((size,) for size in X.shape[1:])
    return X if chunks == X.chunks else X.rechunk(chunks)


def _starts(X) -> list:
    return [int(s) for s in np.cumsum((0,) + X.chunks[0])[:-1]]


def _check_array(detector, X) -> None:
    allowed = (2,) if detector._sample_ndim == 1 else (2, 4)
    if X.ndim not in allowed:
        raise ValueError(f"Expected {' or '.join(map(str, allowed))}-D input, got a dask "
                         f"array of shape {X.shape}")
    if X.shape[0] == 0:
        raise ValueError(f"Found array with 0 sample(s) (shape={X.shape}) while a minimum "
                         "of 1 is required.")
    if np.issubdtype(X.dtype, np.complexfloating):
        raise ValueError("Complex data not supported")


def _seeded(template) -> None:
    """One int seed for every block (PaDiM's channels must agree), drawn if need be."""
    from ._utils import make_generator

    params = template.get_params(deep=False)
    if "random_state" in params and not isinstance(params["random_state"], Integral):
        gen = make_generator(params["random_state"])
        template.set_params(random_state=int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))


# --------------------------------------------------------------------- tasks
#: fitted attributes that PaDiM's merge recomputes from the moments: left out of the
#: states that travel between tasks (two thirds of PaDiM's state), kept in the root's
_DERIVED = ("covariance_", "precision_cholesky_")


def _lighten(est, light: bool):
    if light and hasattr(est, "_current_moments"):  # PaDiM: the moments are the state
        for name in _DERIVED:
            est.__dict__.pop(name, None)
    return est


def _block_state(template, block, start: int, light: bool = False):
    """The partial state of one block: a clone of the detector fitted on it (no offset)."""
    from sklearn.base import clone

    est = clone(template)
    est._reset_device_cache()
    Xt = est._validate_input(block, reset=True)
    try:
        if hasattr(est, "_current_moments"):  # PaDiM: keep the moments the merge needs
            est._accumulate(Xt, reset=True, incremental=True)
            est.__dict__.pop("_fit_loo", None)  # no offset here: nor the block it is for
        else:
            est._fit(Xt)
    except ValueError as exc:
        raise ValueError(
            f"rows {start}:{start + block.shape[0]} of the dask array (one block) could not "
            f"be fitted on their own: {exc}; give the sample axis larger chunks") from exc
    # number patches and samples across the whole array, as a stream does
    if hasattr(est, "coreset_indices_"):
        est.coreset_indices_ = est.coreset_indices_ + start * math.prod(est.input_shape_[1:])
        est.bank_images_ = est.bank_images_ + start
    if hasattr(est, "kde_indices_"):
        est.kde_indices_ = est.kde_indices_ + start
    est._reset_device_cache()
    return _lighten(est, light)


def _merged(left, right, light: bool = False):
    """A new state: ``left`` with ``right`` folded in (inputs left untouched)."""
    out = copy.deepcopy(left)
    out._merge_partial(right)
    out._reset_device_cache()
    return _lighten(out, light)


def _fit_whole(template, block):
    """A single block: the detector's own ``fit``; with the out-of-sample normality
    scores that set its ``offset_`` (for ``fit_predict``; pickles drop them)."""
    from sklearn.base import clone

    fitted = clone(template).fit(block)
    return fitted, fitted._device_cache.get("fit_normality")


def _oos_block(model, block, start: int, method: str):
    """Out-of-sample anomaly scores of a block under the final state, or None."""
    Xt = model._validate_input(block, reset=False)
    try:
        if method == "leave-one-out":
            if model.n_samples_seen_ < model._loo_ddof + 2:
                return None
            scores = model._leave_one_out(Xt)
        else:  # leave-one-image-out
            if model._n_admissible(torch.empty(0)) < 1:
                return None
            images = torch.arange(start, start + Xt.shape[0], device=Xt.device)
            scores = model._score(Xt, images)
    except ValueError:
        return None
    return scores.detach().cpu().numpy().astype(np.float64)


def _score_block(model, block, strict: bool = False):
    """Anomaly scores of a block by a (merged) state; None if it cannot (unless strict)."""
    try:
        Xt = model._validate_input(block, reset=False)
        scores = model._blockwise(model._score, Xt)
    except ValueError:
        if strict:
            raise
        return None
    return scores.detach().cpu().numpy().astype(np.float64)


def _apply(block, estimator, method: str, kwargs: dict):
    return getattr(estimator, method)(block, **kwargs)


# ----------------------------------------------------------------- reduction
def _tree(states: list, light: bool = False):
    """Pairwise merges of delayed states in a binary tree (order kept: left = earlier).

    ``light``: the merges below the root leave out what the root recomputes.
    """
    from dask import delayed

    states = list(states)
    while len(states) > 1:
        below_root = light and len(states) > 2
        paired = [delayed(_merged, pure=True)(states[i], states[i + 1], below_root)
                  for i in range(0, len(states) - 1, 2)]
        states = paired + states[len(paired) * 2:]
    return states[0]


def _method(detector) -> str:
    if hasattr(detector, "_leave_one_out"):
        return "leave-one-out"
    if hasattr(detector, "_n_admissible"):
        return "leave-one-image-out"
    return "cross-fit"


def fit_dask(detector, X):
    """Fit ``detector`` on the dask array ``X`` on the workers (see the module notes).

    Parameters
    ----------
    detector : BaseDetector
        Parameters already validated; fitted in place.
    X : dask.array.Array of shape (n_samples, ...)
        Training samples.

    Returns
    -------
    detector
        Fitted, with ``offset_`` and ``calibration_`` set.

    Raises
    ------
    ValueError
        For input the detector rejects (raised from the block that holds it), a block
        that cannot be fitted alone, or chunks of unknown size.
    """
    import dask
    from dask import delayed
    from sklearn.base import clone

    _check_array(detector, X)
    X = _by_samples(X, 2)
    template = clone(detector)
    _seeded(template)
    scheduler = _scheduler()
    blocks, starts = list(X.to_delayed().ravel()), _starts(X)
    if len(blocks) == 1:
        ((fitted, normality),) = dask.compute(delayed(_fit_whole)(template, blocks[0]),
                                              scheduler=scheduler)
        _adopt(detector, fitted, None, None)  # a new cache: the scores go back in
        detector._device_cache["fit_normality"] = normality
        return detector

    if getattr(detector, "solver", None) == "woodbury":
        raise ValueError(f"{type(detector).__name__}(solver='woodbury') keeps every training "
                         "sample and cannot merge the blocks of a dask array; use solver='full' "
                         "or 'auto', or one block")
    method = _method(detector)
    if method != "cross-fit":
        light = [delayed(_block_state, pure=True)(template, b, s, True)
                 for b, s in zip(blocks, starts)]
        (final,) = dask.persist(_tree(light, light=True), scheduler=scheduler)
        scores = [delayed(_oos_block, pure=True)(final, b, s, method)
                  for b, s in zip(blocks, starts)]
        fitted, *scores = dask.compute(final, *scores, scheduler=scheduler)
        if all(s is not None for s in scores):
            return _adopt(detector, fitted, scores, method)

    states = [delayed(_block_state, pure=True)(template, b, s) for b, s in zip(blocks, starts)]
    k = min(detector._n_splits, len(blocks))
    folds = np.arange(len(blocks)) * k // len(blocks)
    fold_states = dask.persist(*[_tree([states[i] for i in np.flatnonzero(folds == f)])
                                 for f in range(k)], scheduler=scheduler)
    final = _tree(fold_states)
    others = [_tree([fold_states[g] for g in range(k) if g != f]) for f in range(k)]
    scores = [delayed(_score_block, pure=True)(others[f], b) for f, b in zip(folds, blocks)]
    fitted, *scores = dask.compute(final, *scores, scheduler=scheduler)
    if all(s is not None for s in scores):
        return _adopt(detector, fitted, scores, "cross-fit")
    # a fold model could not score: in-sample scores of the final model (optimistic)
    (final,) = dask.persist(delayed(fitted), scheduler=scheduler)
    scores = dask.compute(*[delayed(_score_block)(final, b, True) for b in blocks],
                          scheduler=scheduler)
    _adopt(detector, fitted, None, None)
    from ._utils import CalibrationWarning, user_stacklevel

    why = f"a {k}-fold cross-fit over the blocks of the dask array failed"
    warnings.warn(CalibrationWarning(
        f"{type(detector).__name__}: {why}; offset_ is set from in-sample scores, which "
        "are optimistic: predict may flag more than `contamination` of new normal "
        "samples. Call calibrate(X_heldout) with normal samples not used in fit.",
        reason=why), stacklevel=user_stacklevel())
    detector._set_offset(torch.from_numpy(np.concatenate(scores)), "in-sample")
    return detector


def _adopt(detector, fitted, scores, method):
    """Copy the fitted state (not the parameters) of ``fitted`` into ``detector``."""
    params = detector.get_params(deep=False)
    offset = {k: fitted.__dict__[k] for k in ("offset_", "calibration_")
              if k in fitted.__dict__}
    detector._clear_fitted_state()
    detector.__dict__.update({k: v for k, v in fitted.__dict__.items()
                              if k not in params and k not in offset})
    detector._reset_device_cache()
    if scores is None:
        detector.__dict__.update(offset)
    else:
        detector._set_offset(torch.from_numpy(np.concatenate(scores)), method)
    return detector


# ------------------------------------------------------------------- scoring
def map_samples(estimator, method: str, X, sample_shape: tuple, dtype, **kwargs):
    """``estimator.method(X_block)`` on every block of ``X``, as a dask array.

    The blocks split only the sample axis; each result has ``sample_shape`` per sample.
    The fitted estimator travels to the workers once (scattered to every worker of a
    distributed client, else a delayed object).
    """
    import dask

    X = _by_samples(X)
    shape = tuple(int(s) for s in sample_shape)
    client = _scheduler()
    if client is not None:  # on every worker once, not inside the graph
        est = client.scatter(estimator, broadcast=True, hash=False)
    else:
        est = dask.delayed(estimator, pure=False)  # a random key: no hashing of the model
    return X.map_blocks(
        _apply, est, method, kwargs, dtype=dtype,
        chunks=(X.chunks[0], *((s,) for s in shape)),
        drop_axis=list(range(1, X.ndim)), new_axis=list(range(1, 1 + len(shape))) or None,
        meta=np.empty((0,) * (1 + len(shape)), dtype=dtype))


def map_shape(detector, output_size) -> tuple:
    """Per-sample shape of ``anomaly_map``'s result."""
    if output_size is None:
        return tuple(detector.input_shape_[1:])
    if isinstance(output_size, Integral):
        return (int(output_size), int(output_size))
    return tuple(int(s) for s in output_size)


def transform_dask(extractor, X):
    """``FeatureExtractor.transform`` of a dask array of images, block by block.

    The per-image shape of the features comes from one all-zero image on the client.
    """
    if X.ndim not in (2, 4):
        raise ValueError(f"X must be 4-D (n_samples, channels, height, width), or 2-D "
                         f"(n_samples, channels); got a dask array of shape {X.shape}")
    probe = extractor.transform(np.zeros((1, *X.shape[1:]), dtype=X.dtype))
    return map_samples(extractor, "transform", X, probe.shape[1:], np.float32)
