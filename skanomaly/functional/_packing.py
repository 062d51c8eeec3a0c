"""Stacks of square matrices pickled as one triangle, exactly (for compact model files).

A triangular factor (zeros in the other triangle) or a symmetric matrix (the other
triangle its mirror image) needs ``d (d + 1) / 2`` of its ``d**2`` numbers. Entries that
break the pattern (a scatter accumulated by rank-one updates can differ from its mirror
in the last bit) are kept beside the triangle, so unpickling gives back the same bits.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["PackedMatrices", "unpack_matrices"]

#: smallest matrix side worth packing (the triangle must save more than the bookkeeping)
_MIN_SIDE = 4


def _triangle(d: int, keep: str):
    return np.tril_indices(d) if keep == "lower" else np.triu_indices(d)


def unpack_matrices(shape, keep: str, other: str, packed, patch_index, patch_values,
                    as_tensor: bool = False):
    """The (..., d, d) array that :class:`PackedMatrices` packed, bit for bit.

    ``keep`` names the stored triangle (``"lower"`` or ``"upper"``), ``other`` what
    fills the rest (``"zero"`` or ``"mirror"``); ``patch_index`` / ``patch_values`` are
    the flat positions and values of the entries that differ from that pattern.
    """
    d = shape[-1]
    out = np.zeros(shape, dtype=packed.dtype)
    rows, cols = _triangle(d, keep)
    if other == "mirror":
        out[..., cols, rows] = packed
    out[..., rows, cols] = packed
    out.reshape(-1)[patch_index] = patch_values
    return torch.from_numpy(out) if as_tensor else out


class PackedMatrices:
    """Pickles a stack of square matrices as one triangle plus exact patches.

    Unpickling gives back a plain :class:`numpy.ndarray` (or CPU tensor) with the same
    bits as the original: this object only exists while pickling, as the value of an
    attribute in a ``__getstate__``.

    Parameters
    ----------
    a : ndarray or CPU Tensor of shape (..., d, d)
        The matrices.
    keep : {"lower", "upper"}
        The triangle stored.
    other : {"zero", "mirror"}
        What the other triangle holds: zeros (a triangular factor) or the mirror image
        of ``keep`` (a symmetric matrix).

    Examples
    --------
    >>> import pickle
    >>> import numpy as np
    >>> from skanomaly.functional._packing import PackedMatrices
    >>> upper = np.triu(np.random.default_rng(0).normal(size=(3, 50, 50)))
    >>> packed = pickle.dumps(PackedMatrices(upper, "upper", "zero"))
    >>> len(packed) < 0.55 * upper.nbytes, np.array_equal(pickle.loads(packed), upper)
    (True, True)
    """

    def __init__(self, a, keep: str, other: str):
        if keep not in ("lower", "upper") or other not in ("zero", "mirror"):
            raise ValueError(f"keep must be 'lower' or 'upper' and other 'zero' or "
                             f"'mirror', got {keep!r}, {other!r}")
        self.original = a
        self.as_tensor = isinstance(a, torch.Tensor)
        self.a = a.numpy() if self.as_tensor else np.asarray(a)
        self.keep, self.other = keep, other

    @staticmethod
    def unwrap(state: dict) -> dict:
        """``state`` with every PackedMatrices replaced by the matrices it wraps.

        For ``__setstate__``: :func:`copy.copy` hands ``__getstate__``'s objects over
        as they are (only pickling and :func:`copy.deepcopy` go through the packing).
        """
        return {k: v.original if isinstance(v, PackedMatrices) else v
                for k, v in state.items()}

    def _reduce_args(self):
        a = self.a
        rows, cols = _triangle(a.shape[-1], self.keep)
        packed = a[..., rows, cols]
        rebuilt = unpack_matrices(a.shape, self.keep, self.other, packed,
                                  np.empty(0, np.int64), a[..., :0, 0].reshape(-1))
        # bitwise comparison: -0.0 and NaN payloads count as differences too
        bits = f"u{a.dtype.itemsize}"
        index = np.flatnonzero(rebuilt.reshape(-1).view(bits) != a.reshape(-1).view(bits))
        return (a.shape, self.keep, self.other, packed, index, a.reshape(-1)[index],
                self.as_tensor)

    def __reduce__(self):
        a = self.a
        whole = (torch.from_numpy if self.as_tensor else np.asarray, (np.ascontiguousarray(a),))
        if (a.ndim < 2 or a.shape[-1] != a.shape[-2] or a.shape[-1] < _MIN_SIDE
                or a.dtype.kind != "f" or a.size == 0):
            return whole
        args = self._reduce_args()
        # a patch entry costs an index and a value: packing must still pay
        if 2 * len(args[4]) >= a.size - args[3].size:
            return whole
        return unpack_matrices, args
