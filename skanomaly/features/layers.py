"""Layer outputs of a backbone as one feature map: forward hooks on the chosen layers
(:func:`forward_layers`), their maps resized and concatenated (:func:`embed`), the
:class:`FeatureModule` that runs both on images, and the backbone copies that run only
what the features need (:func:`truncated`, :func:`fold_batch_norms`).

Used by :class:`~skanomaly.features.FeatureExtractor` and the modules it exports;
public to the package, not part of the documented API.
"""

from __future__ import annotations

import copy
import threading

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)


IMAGENET_STD = (0.229, 0.224, 0.225)


class _StopForward(Exception):
    """Raised by the last hook to end a forward pass once every layer is captured."""


def forward_layers(model, layers, x, stop_after=None) -> tuple[dict, int]:
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


def embed(outputs: dict, layers, selection=None, out=None) -> torch.Tensor:
    """Resize every layer's map to the first layer's grid (nearest) and concatenate.

    ``selection``: per layer, the indices of its channels to keep (None: all), applied
    BEFORE the resize (nearest interpolation is per channel, so the result equals
    selecting from the full concatenation, bitwise, at a fraction of the work).
    ``out``: a contiguous (n, C_out, H, W) tensor to write the result into, layer by
    layer (the same values, without the concatenation's copy); returned.
    """
    size = outputs[layers[0]].shape[-2:]
    if out is not None:
        start = 0
        for layer in _resized(outputs, layers, selection, size, skip_same_size=True):
            out[:, start: start + layer.shape[1]].copy_(layer)
            start += layer.shape[1]
        return out
    # no shape test to skip the first layer's resize: under a trace it would turn
    # traced sizes into Python constants (the resize to its own size is a copy)
    maps = list(_resized(outputs, layers, selection, size, skip_same_size=False))
    # one (NCHW) layout out, whatever layout the backbone computed in
    return torch.cat(maps, dim=1).contiguous()


def _resized(outputs: dict, layers, selection, size, *, skip_same_size: bool):
    """Each layer's map, its ``selection`` of channels kept, resized (nearest) to
    ``size``; one already of that size is passed as is if ``skip_same_size``."""
    for i, name in enumerate(layers):
        layer = outputs[name]
        if selection is not None and selection[i] is not None:
            layer = layer.index_select(1, selection[i])
        if not (skip_same_size and layer.shape[-2:] == size):
            layer = F.interpolate(layer, size=size, mode="nearest")
        yield layer


def layer_selection(channels, widths, device) -> list:
    """``channels`` (sorted indices into the concatenation of layers ``widths`` wide) as
    per-layer index tensors on ``device`` (None for a layer kept whole)."""
    channels = np.asarray(channels, dtype=np.int64)
    selection, start = [], 0
    for width in widths:
        mine = channels[(channels >= start) & (channels < start + width)] - start
        selection.append(None if len(mine) == width else torch.as_tensor(mine, device=device))
        start += width
    return selection


class FeatureModule(torch.nn.Module):
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
        """The hooked layers' outputs and the number of hook calls (see forward_layers).

        On the CPU the backbone runs on channels-last (NHWC) images whatever the
        caller's layout: oneDNN's NHWC convolutions ran resnet18 to layer3 1.36x faster
        than NCHW (32 images of 224 px, 2 threads, 2-core EPYC), and one layout for all
        input keeps the features independent of the caller's strides.
        """
        if self.normalize:
            x = (x - self.mean) / self.std
        if x.device.type == "cpu" and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return forward_layers(self.backbone, self.layers, x, self.stop_after)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return embed(self.layer_outputs(x)[0], self.layers)

    def features(self, x: torch.Tensor, selection=None, out=None) -> torch.Tensor:
        """:meth:`forward` keeping only the channels of ``selection``, written into
        ``out`` if given (see ``embed``)."""
        return embed(self.layer_outputs(x)[0], self.layers, selection, out)


def truncated(model: torch.nn.Module, layers, stop_after: int, probe: torch.Tensor,
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
            reference = FeatureModule(model, layers, normalize=normalize,
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
            same = torch.equal(FeatureModule(trimmed, layers, normalize=normalize,
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


def fold_batch_norms(model: torch.nn.Module, layers, stop_after: int, normalize: bool,
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
                model, lambda: FeatureModule(model, layers, **args)(probe))
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
            reference = FeatureModule(model, layers, **args)(probe)
            got = FeatureModule(folded, layers, **args)(probe)
        scale = float(reference.abs().amax())
        same = bool(((got - reference).abs() <= 1e-4 * scale).all())
    except Exception:  # noqa: BLE001 - any failure of the folded copy: keep the model
        same = False
    return folded if same else model


def first_conv_in_channels(model) -> int | None:
    convs = (m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    return next((conv.in_channels for conv in convs), None)
