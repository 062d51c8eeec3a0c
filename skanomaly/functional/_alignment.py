"""Zero padding of a matrix product's contraction dimension to aligned rows.

Why: a BLAS GEMM kernel picks its code path per row of the left operand by the row's
address. Rows of ``K`` float64 entries, ``K`` odd, start at addresses that are 8-byte
but not 16-, 32- or 64-byte aligned, and differently aligned rows take different paths
(peeled loads, another accumulation order): with MKL on an AVX-512 CPU, ``A @ B.T``
for ``A`` of 1,024 rows and ``K`` in {5, 7, 9, 17} gives about 4,000 of 5,120 rows
other bits when the rows of ``A`` are rolled to other positions, and none for ``K``
in {4, 8, 16, 32, 100}. Fixing the shape of every product (``base.in_fixed_blocks``)
does not fix this: the same sample sits at another row, at another alignment.

The fix by construction: every left operand whose rows must not depend on their
position gets its contraction dimension padded with zero columns to a multiple of 64
bytes (8 float64 or 16 float32 entries), and the right operand matching zero rows.
Every row then starts at the same alignment as every other (64-byte multiples from a
64-byte aligned allocation: torch's CPU allocator aligns to 64 bytes), whatever CPU
or BLAS. Zeros add exactly nothing: each output entry is the sum of the same products
plus exact zeros; only the kernel's path becomes the same for every row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: bytes that every padded row spans a multiple of: a cache line, an AVX-512 register
ALIGNMENT_BYTES = 64


def aligned_width(width: int, dtype: torch.dtype) -> int:
    """Smallest multiple of ``ALIGNMENT_BYTES`` worth of ``dtype`` entries >= ``width``.

    Parameters
    ----------
    width : int
        Number of entries (the contraction dimension).
    dtype : torch.dtype
        Their dtype.

    Returns
    -------
    int
        ``width`` rounded up to a multiple of 8 (float64), 16 (float32) entries, ...

    Examples
    --------
    >>> import torch
    >>> [aligned_width(n, torch.float64) for n in (5, 8, 17)], aligned_width(5, torch.float32)
    ([8, 8, 24], 16)
    """
    step = max(1, ALIGNMENT_BYTES // dtype.itemsize)
    return -(-int(width) // step) * step


def pad_aligned(t: torch.Tensor, dim: int = -1, width: int = 0,
                size: int | None = None) -> torch.Tensor:
    """``t`` with zeros appended along ``dim`` to an aligned width (see the module).

    Pads a product's left operand along its last dimension (``dim=-1``) and its right
    operand along both of its matrix dimensions (the contraction, and the output
    columns, whose rows are the product's rows: their alignment counts too). A tensor
    already that wide is returned as it is (no copy), so that fitted modules pad their
    constant operands once, at construction, and their forward passes only the
    samples.

    Parameters
    ----------
    t : Tensor
        Any shape, float32 or float64.
    dim : int, default=-1
        The dimension to extend.
    width : int, default=0
        At least this many entries along ``dim``.
    size : int, optional
        ``t.shape[dim]`` as a Python int. Traced code (``torch.jit.trace``, the ONNX
        export), where shapes are tensors, passes the static feature width here, so
        that nothing is converted to a Python number; by default read from ``t``.

    Returns
    -------
    Tensor
        ``t`` itself if ``size`` is already ``aligned_width(max(width, size),
        t.dtype)``, else a new contiguous tensor of that length along ``dim``: ``t``
        followed by zeros.

    Examples
    --------
    >>> import torch
    >>> a = torch.ones(3, 5, dtype=torch.float64)
    >>> b = torch.ones(5, 2, dtype=torch.float64)
    >>> b8 = pad_aligned(pad_aligned(b, dim=-2), dim=-1)
    >>> a8 = pad_aligned(a)
    >>> a8.shape, b8.shape, bool(torch.equal((a8 @ b8)[:, :2], a @ b))
    (torch.Size([3, 8]), torch.Size([8, 8]), True)
    >>> pad_aligned(b8, dim=-2) is b8
    True
    """
    dim = dim % t.dim()
    size = t.shape[dim] if size is None else size
    target = aligned_width(max(size, width), t.dtype)
    if target == size:
        return t
    return F.pad(t, [0, 0] * (t.dim() - 1 - dim) + [0, target - size])


def realign(t: torch.Tensor, sizes) -> torch.Tensor:
    """A padded buffer re-cut to the aligned widths of its (new) dtype.

    After a module is cast (``module.to(torch.float32)`` of a float64 fit), rows
    padded to 8 float64 entries are 32 bytes of float32: the trailing dimensions of
    ``t`` whose unpadded length is given in ``sizes`` (None: left as they are) are cut
    back to that length and padded again, with zeros, to ``aligned_width`` in
    ``t.dtype``. Only padding zeros are dropped or added; ``t`` itself is returned
    when nothing changes.

    Parameters
    ----------
    t : Tensor
        A buffer padded by :func:`pad_aligned`.
    sizes : sequence of int or None
        Unpadded lengths of the last ``len(sizes)`` dimensions of ``t``.

    Returns
    -------
    Tensor

    Examples
    --------
    >>> import torch
    >>> b = pad_aligned(torch.ones(5, 5, dtype=torch.float64), dim=-2)
    >>> realign(b.float(), (5, None)).shape, realign(b, (5, None)) is b
    (torch.Size([16, 5]), True)
    """
    out = t
    for offset, n in enumerate(sizes):
        if n is None:
            continue
        dim = t.dim() - len(sizes) + offset
        target = aligned_width(n, t.dtype)
        if out.shape[dim] > target:
            out = out.narrow(dim, 0, target)
        elif out.shape[dim] < target:
            out = pad_aligned(out, dim, width=target)
    return t if out is t else out.contiguous()
