"""Backbones built by name: torchvision classification models and timm models, with
random, torchvision, packaged (:mod:`skanomaly.features.pretrained`) or state_dict-file
weights.

torchvision and timm are imported only when a backbone is built, so importing this
module needs torch alone. :class:`~skanomaly.features.FeatureExtractor` builds its
backbone here (:func:`build_backbone`).
"""

from __future__ import annotations

import copy
import difflib
import os
import pickle
import threading
from collections.abc import Mapping
from pathlib import Path

import torch

from .pretrained import PACKAGED_WEIGHTS, load_packaged_weights

__all__ = ["split_backbone"]

_LIBRARIES = ("torchvision", "timm")


_WEIGHT_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def _is_weight_file(weights) -> bool:
    if isinstance(weights, os.PathLike):
        return True
    return (
        "/" in weights
        or os.sep in weights
        or weights.endswith(_WEIGHT_FILE_SUFFIXES)
        or Path(weights).exists()
    )


def _load_state_dict(path) -> Mapping:
    """``torch.load(path, weights_only=True)`` onto the CPU, with clear errors."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"weights file {os.fspath(path)!r} does not exist")
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
        raise ValueError(
            f"could not read {os.fspath(path)!r} with torch.load(weights_only=True); save "
            f"the weights with torch.save(model.state_dict(), path): {exc}"
        ) from exc
    if not isinstance(state_dict, Mapping):
        raise ValueError(
            f"{os.fspath(path)!r} holds a {type(state_dict).__name__}, not a state_dict; "
            "save it with torch.save(model.state_dict(), path)"
        )
    return state_dict


def load_weights_file(model: torch.nn.Module, path) -> None:
    try:
        model.load_state_dict(_load_state_dict(path), strict=True)
    except RuntimeError as exc:
        raise ValueError(
            f"the state_dict in {os.fspath(path)!r} does not match the backbone: {exc}"
        ) from exc


def _weight_enum(models, name: str, weights: str):
    """torchvision weights enum member for ``weights`` ("IMAGENET1K_V1", "DEFAULT" or
    "ResNet18_Weights.IMAGENET1K_V1") of model ``name``."""
    enum_cls = models.get_model_weights(name)
    prefix, _, member = weights.rpartition(".")
    if prefix not in ("", enum_cls.__name__) or member not in enum_cls.__members__:
        valid = ", ".join(enum_cls.__members__)
        raise ValueError(
            f"unknown weights {weights!r} for backbone {name!r}; torchvision offers "
            f"{enum_cls.__name__}.{{{valid}}} (downloaded on first use), or pass a path "
            f"to a state_dict file; packaged weights (no download): {_named_weights_hint()}"
        )
    return enum_cls[member]


def split_backbone(name: str) -> tuple[str, str]:
    """Library and model name of a backbone given by name.

    Parameters
    ----------
    name : str
        ``"timm/<model>"`` for a timm model, ``"torchvision/<model>"`` or a bare
        ``"<model>"`` for a torchvision classification model.

    Returns
    -------
    library : {"torchvision", "timm"}
        The library that builds the model.
    model : str
        The model's name in that library.

    Raises
    ------
    ValueError
        If the prefix before ``/`` names no known library, or the model name is empty.

    Examples
    --------
    >>> from skanomaly.features.backbones import split_backbone
    >>> split_backbone("timm/tf_efficientnet_lite0"), split_backbone("resnet18")
    (('timm', 'tf_efficientnet_lite0'), ('torchvision', 'resnet18'))
    """
    library, sep, model = name.partition("/")
    if not sep:
        library, model = "torchvision", name
    elif library not in _LIBRARIES:
        close = difflib.get_close_matches(library, _LIBRARIES, n=1)
        hint = f"; did you mean '{close[0]}/{model}'?" if close else ""
        raise ValueError(
            f"unknown library {library!r} in backbone {name!r}{hint} Name a backbone as "
            "'timm/<model>' (timm) or '<model>' / 'torchvision/<model>' (torchvision)"
        )
    if not model:
        raise ValueError(f"backbone {name!r} names no model after the library prefix")
    return library, model


def check_packaged(name: str, weights) -> bool:
    """True if ``weights`` names packaged weights; ValueError if they are for another
    backbone than ``name`` (None for a module backbone: any module may take them)."""
    if not isinstance(weights, str) or weights not in PACKAGED_WEIGHTS:
        return False
    expected = PACKAGED_WEIGHTS[weights].backbone
    if name is not None and split_backbone(name) != split_backbone(expected):
        raise ValueError(
            f"weights {weights!r} are for backbone {expected!r}, not {name!r}; pass "
            f"backbone={expected!r}"
        )
    return True


def _named_weights_hint() -> str:
    return ", ".join(f"{name!r} (backbone {w.backbone!r})"
                     for name, w in PACKAGED_WEIGHTS.items())


def _build_timm(name: str, weights, seed: int) -> torch.nn.Module:
    """Build timm model ``name`` (without its own pretrained weights, which download);
    random init seeded by ``seed`` under :func:`torch.random.fork_rng`."""
    full = f"timm/{name}"
    try:
        import timm
    except ImportError as exc:
        raise ImportError(
            f"building backbone {full!r} needs timm; install it (pip install timm) or "
            "pass an nn.Module as backbone"
        ) from exc
    if not timm.is_model(name):
        names = timm.list_models()
        close = difflib.get_close_matches(name, names, n=3)
        hint = f"; did you mean {', '.join('timm/' + c for c in close)}?" if close else ""
        raise ValueError(
            f"unknown backbone {full!r}{hint} timm has {len(names)} architectures (see "
            "timm.list_models()); name one as 'timm/<architecture>'"
        )
    packaged = check_packaged(full, weights)
    from_file = weights is not None and not packaged and _is_weight_file(weights)
    if weights is not None and not packaged and not from_file:
        raise ValueError(
            f"unknown weights {weights!r} for backbone {full!r}; a timm backbone takes "
            f"weights=None (random initialisation), the path of a state_dict file, or "
            f"packaged weights: {_named_weights_hint()} (timm's own pretrained weights "
            "download from the Hugging Face Hub: save them with torch.save(model."
            "state_dict(), path) where there is network access and pass the path)"
        )
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        model = timm.create_model(name, pretrained=False)
    if packaged:
        load_packaged_weights(model, weights)
    elif from_file:
        load_weights_file(model, weights)
    return model


# The backbone built last, by (name, weights, seed): a fit of the same extractor again
# (GridSearchCV's refits, a benchmark's repeats, a fresh pipeline in a notebook) copies it
# instead of drawing its random initialisation (torchvision's resnet18 draws twice: 75 ms
# of one thread, 7 % of a DFM fit on 100 images) or reading and hashing a weights file.
# One entry: memory stays at one unused model. Weights files are not cached (they may
# change on disk between fits).
_LAST_BUILT: dict = {}
_LAST_BUILT_LOCK = threading.Lock()


def build_backbone(name: str, weights, seed: int) -> torch.nn.Module:
    """A fresh backbone ``name`` with ``weights``, randomly initialised from ``seed``.

    Equal, parameter for parameter and buffer for buffer, to what building it again
    gives (a copy of the last build of the same name, weights and seed, when the weights
    are random, packaged or torchvision's: see ``_LAST_BUILT``); never the same object
    twice.
    """
    key = None
    if weights is None or (isinstance(weights, str) and not _is_weight_file(weights)):
        key = (name, weights, int(seed))
    with _LAST_BUILT_LOCK:
        cached = _LAST_BUILT.get(key) if key is not None else None
        if cached is not None:
            return copy.deepcopy(cached)
    library, arch = split_backbone(name)
    if library == "timm":
        model = _build_timm(arch, weights, seed)
    else:
        check_packaged(name, weights)
        model = _build_torchvision(arch, weights, seed)
    if key is not None:
        with _LAST_BUILT_LOCK:
            _LAST_BUILT.clear()
            _LAST_BUILT[key] = copy.deepcopy(model)
    return model


def _build_torchvision(name: str, weights, seed: int) -> torch.nn.Module:
    """Build torchvision classification model ``name``; random init is seeded by ``seed``
    inside :func:`torch.random.fork_rng`, so the global RNG comes out unchanged."""
    try:
        import torchvision.models as models
    except ImportError as exc:
        raise ImportError(
            f"building backbone {name!r} by name needs torchvision; install it or pass "
            "an nn.Module as backbone"
        ) from exc
    names = models.list_models(module=models)
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(
            f"unknown backbone {name!r}{hint} torchvision classification models include "
            f"{', '.join(names[:8])}, ... ({len(names)} in all, see "
            "torchvision.models.list_models()); or pass an nn.Module"
        )
    from_file = weights is not None and _is_weight_file(weights)
    enum = None if weights is None or from_file else _weight_enum(models, name, weights)
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        try:
            model = models.get_model(name, weights=enum)
        except (OSError, RuntimeError) as exc:
            if enum is None:
                raise
            raise ValueError(
                f"could not load torchvision weights {enum} (downloaded on first use, then "
                "cached under torch.hub.get_dir()); without network access, pass the path of "
                f"a local state_dict file as weights instead: {exc}"
            ) from exc
    if from_file:
        load_weights_file(model, weights)
    return model
