"""Tests of skanomaly.features.FeatureExtractor.

References are computed independently: forward passes written out stage by stage,
ImageNet normalisation in numpy and nearest-neighbour resizing by numpy indexing
(PyTorch's "nearest" rule, source index floor(i * in / out)).
"""

from __future__ import annotations

import copy
import pickle
import subprocess
import sys
import urllib.error
import warnings
from collections import OrderedDict

import joblib
import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose, assert_array_equal
from sklearn.base import clone
from sklearn.utils._param_validation import InvalidParameterError
from sklearn.utils.estimator_checks import parametrize_with_checks
from torch import nn
from torch.nn.utils import skip_init

from skanomaly.features import FeatureExtractor

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32).reshape(1, 3, 1, 1)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32).reshape(1, 3, 1, 1)


def tiny_net(seed=0, first_inplace_relu=False):
    """Three small convs (16x16 -> 16, 8, 4), initialised from a local generator only."""
    gen = torch.Generator().manual_seed(seed)
    stages = [("c1", skip_init(nn.Conv2d, 3, 4, 3, padding=1)), ("r1", nn.ReLU())]
    stages += [("c2", skip_init(nn.Conv2d, 4, 6, 3, stride=2, padding=1)), ("r2", nn.ReLU())]
    stages += [("c3", skip_init(nn.Conv2d, 6, 5, 3, stride=2, padding=1))]
    if first_inplace_relu:
        stages.insert(0, ("r0", nn.ReLU(inplace=True)))
    net = nn.Sequential(OrderedDict(stages))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    return net


def channel_free_net():
    """Parameter-free layers that take any channel count and 1x1 maps (common checks)."""
    return nn.Sequential(OrderedDict(pool=nn.AvgPool2d(1), act=nn.ReLU()))


def nearest(a, size):
    """Nearest resize of (N, C, h, w) to ``size`` by numpy indexing (torch's 'nearest')."""
    rows = np.arange(size[0]) * a.shape[2] // size[0]
    cols = np.arange(size[1]) * a.shape[3] // size[1]
    return a[:, :, rows][:, :, :, cols]


def concat_on_first_grid(maps):
    size = maps[0].shape[2:]
    return np.concatenate([nearest(m, size) for m in maps], axis=1)


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).random((4, 3, 32, 32), dtype=np.float32)


@pytest.fixture(scope="module")
def fitted_resnet(images):
    return FeatureExtractor("resnet18", random_state=0, device="cpu").fit(images)


@parametrize_with_checks(
    [FeatureExtractor(channel_free_net(), ["pool", "act"], normalize=False, device="cpu")]
)
def test_sklearn_compatible(estimator, check):
    # 2-D input (n, D) is read as (n, D, 1, 1) images; a channel-agnostic backbone lets
    # every common check run, none is expected to fail.
    check(estimator)


# ----------------------------------------------------------------- reference values
@pytest.mark.parametrize("layout", [torch.channels_last, torch.contiguous_format])
def test_resnet_matches_hand_written_forward(fitted_resnet, images, layout):
    m = fitted_resnet.model_
    x = torch.from_numpy((images - MEAN) / STD).contiguous(memory_format=layout)
    with torch.no_grad():
        x1 = m.layer1(m.maxpool(m.relu(m.bn1(m.conv1(x)))))
        x2 = m.layer2(x1)
        x3 = m.layer3(x2)
    expected = concat_on_first_grid([x1.numpy(), x2.numpy(), x3.numpy()])
    features = fitted_resnet.transform(images)
    assert features.dtype == np.float32 and features.flags.c_contiguous
    assert features.shape == (4, 64 + 128 + 256, 8, 8) == (4, *fitted_resnet.feature_shape_)
    # the extractor folds batch norms into the convolutions and, on the CPU, computes
    # channels-last: the sums run in another order, float32 rounding of the features' scale
    assert_allclose(features, expected, rtol=0, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("layers", [["c1", "c3"], ["c3", "r1", "c2"]])
def test_module_backbone_matches_stagewise_forward(layers):
    net = tiny_net()
    x = np.random.default_rng(1).normal(size=(3, 3, 16, 16)).astype(np.float32)
    outputs, h = {}, torch.from_numpy(x)
    with torch.no_grad():
        for name, stage in net.named_children():
            h = outputs[name] = stage(h)
    expected = concat_on_first_grid([outputs[name].numpy() for name in layers])
    fe = FeatureExtractor(net, layers, normalize=False, device="cpu").fit(x)
    assert fe.layers_ == tuple(layers)
    assert_allclose(fe.transform(x), expected, rtol=1e-6, atol=1e-6)


def test_transform_stops_after_last_needed_layer(fitted_resnet, images):
    calls = []
    handle = fitted_resnet.model_.layer4.register_forward_hook(lambda *a: calls.append(1))
    try:
        fitted_resnet.transform(images[:1])
    finally:
        handle.remove()
    assert calls == []
    assert all(not m._forward_hooks for m in fitted_resnet.model_.modules())


def test_other_spatial_size_and_input_forms(fitted_resnet, images):
    big = np.random.default_rng(2).random((2, 3, 64, 64), dtype=np.float32)
    assert fitted_resnet.transform(big).shape == (2, 448, 16, 16)
    ref = fitted_resnet.transform(images)
    assert_array_equal(fitted_resnet.transform(torch.from_numpy(images)), ref)
    assert_allclose(fitted_resnet.transform(images.astype(np.float64)), ref, atol=1e-6)
    assert_allclose(fitted_resnet.transform(images.tolist()), ref, atol=1e-6)


def test_2d_input_is_read_as_1x1_images():
    X = np.random.default_rng(3).normal(size=(5, 7))
    fe = FeatureExtractor(channel_free_net(), ["pool", "act"], normalize=False).fit(X)
    assert fe.n_features_in_ == 7
    assert_array_equal(fe.transform(X), fe.transform(X[:, :, None, None]))
    assert_allclose(fe.transform(X)[:, 7:, 0, 0], np.maximum(X, 0), rtol=1e-6)


def test_uint8_is_scaled_by_1_over_255(fitted_resnet):
    X = np.random.default_rng(4).integers(0, 256, size=(2, 3, 32, 32), dtype=np.uint8)
    expected = fitted_resnet.transform(X.astype(np.float32) / np.float32(255))
    assert_allclose(fitted_resnet.transform(X), expected, rtol=1e-6, atol=1e-6)
    assert_allclose(fitted_resnet.transform(torch.from_numpy(X)), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_batch_size_does_not_change_results(fitted_resnet, images, batch_size):
    fe = copy.deepcopy(fitted_resnet).set_params(batch_size=batch_size)
    expected = fitted_resnet.transform(images)  # one batch of 4
    # other batch shapes may pick other conv algorithms: float32 round-off only
    assert_allclose(fe.transform(images), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("pixels", [32 * 32, 3 * 32 * 32])
def test_cpu_forward_slices_give_the_one_call_features(fitted_resnet, images, pixels,
                                                       monkeypatch):
    # slices of 1 and 3 images (the last one short) against one forward of the batch
    from skanomaly.features import extractor
    module = fitted_resnet._torch_module(torch.device("cpu"))
    with torch.inference_mode():
        expected = module(torch.from_numpy(images)).numpy()
    monkeypatch.setattr(extractor, "_CPU_FORWARD_PIXELS", pixels)
    calls = []
    monkeypatch.setattr(type(module), "features",
                        lambda self, x, sel=None, out=None: calls.append(len(x)) or
                        extractor.embed(self.layer_outputs(x)[0], self.layers, sel, out))
    got = fitted_resnet.transform(images)
    assert calls == ([1, 1, 1, 1] if pixels == 32 * 32 else [3, 1])
    assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_embed_into_an_output_is_the_concatenation(fitted_resnet, images):
    """transform writes each layer's resized map into its rows and channels of one
    output: the values of the concatenation, bitwise, with or without a selection."""
    from skanomaly.features.layers import embed, layer_selection

    module = fitted_resnet._torch_module(torch.device("cpu"))
    with torch.inference_mode():
        outputs = module.layer_outputs(torch.from_numpy(images))[0]
        widths = [outputs[name].shape[1] for name in module.layers]
        for selection in (None, layer_selection([0, 5, 70, 200, 447], widths, "cpu")):
            expected = embed(outputs, module.layers, selection)
            out = torch.full_like(expected, float("nan"))
            assert embed(outputs, module.layers, selection, out=out) is out
            assert torch.equal(out, expected)
        got = fitted_resnet.transform(torch.from_numpy(images))
        assert torch.equal(got, torch.from_numpy(fitted_resnet.transform(images)))


# --------------------------------------------------------------- reproducibility, RNG
def test_random_state_reproducible_and_global_rng_untouched(fitted_resnet, images):
    torch_state, np_state = torch.get_rng_state(), np.random.get_state()
    same = FeatureExtractor("resnet18", random_state=0, device="cpu").fit(images)
    other = FeatureExtractor("resnet18", random_state=1, device="cpu").fit(images)
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert np.random.get_state()[1].tolist() == np_state[1].tolist()
    assert_array_equal(same.transform(images), fitted_resnet.transform(images))
    assert not np.allclose(other.transform(images), fitted_resnet.transform(images))


def test_unseeded_fit_leaves_global_rng_untouched(images):
    torch_state = torch.get_rng_state()
    FeatureExtractor(tiny_net(), ["c1"], normalize=False, device="cpu").fit(images)
    # random_state=None draws OS entropy, not the global generator
    FeatureExtractor("squeezenet1_1", ["features.3"], device="cpu").fit(images)
    assert torch.equal(torch.get_rng_state(), torch_state)


def test_pickle_joblib_clone_round_trips(fitted_resnet, images, tmp_path):
    expected = fitted_resnet.transform(images)
    assert_array_equal(pickle.loads(pickle.dumps(fitted_resnet)).transform(images), expected)
    joblib.dump(fitted_resnet, tmp_path / "fe.joblib")
    assert_array_equal(joblib.load(tmp_path / "fe.joblib").transform(images), expected)
    assert_array_equal(clone(fitted_resnet).fit(images).transform(images), expected)


def test_inputs_are_not_modified(images):
    net = tiny_net(first_inplace_relu=True)  # would write into its input if given it
    X = images - 0.5
    for data in (X, torch.from_numpy(X), (images * 255).astype(np.uint8)):
        before = copy.deepcopy(data)
        fe = FeatureExtractor(net, ["c1", "c2"], normalize=False, device="cpu")
        fe.fit(data).transform(data)
        assert_array_equal(np.asarray(data), np.asarray(before))
    params = [p.clone() for p in net.parameters()]
    assert all(torch.equal(p, q) for p, q in zip(params, net.parameters()))
    assert all(p.requires_grad for p in net.parameters()) and net.training


def test_read_only_input(fitted_resnet, images):
    X = images.copy()
    X.setflags(write=False)
    assert_array_equal(fitted_resnet.transform(X), fitted_resnet.transform(images))


# ------------------------------------------------------------------------- weights
def test_state_dict_file_round_trip(fitted_resnet, images, tmp_path):
    path = tmp_path / "w.pt"
    torch.save(fitted_resnet.model_.state_dict(), path)
    expected = fitted_resnet.transform(images)
    # random_state=1 would give other weights: equality shows the file was loaded
    by_name = FeatureExtractor("resnet18", weights=str(path), random_state=1, device="cpu")
    assert_allclose(by_name.fit(images).transform(images), expected, rtol=0, atol=0)
    other = FeatureExtractor("resnet18", random_state=1, device="cpu").fit(images).model_
    as_module = FeatureExtractor(other, weights=path, device="cpu").fit(images)
    assert_allclose(as_module.transform(images), expected, rtol=0, atol=0)
    assert not torch.equal(other.conv1.weight, fitted_resnet.model_.conv1.weight)


def test_state_dict_errors(fitted_resnet, images, tmp_path):
    small = tmp_path / "small.pt"
    torch.save(tiny_net().state_dict(), small)
    with pytest.raises(ValueError, match="does not match the backbone"):
        FeatureExtractor(copy.deepcopy(fitted_resnet.model_), weights=small).fit(images)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        FeatureExtractor(tiny_net(), ["c1"], weights=tmp_path / "none.pt").fit(images)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        FeatureExtractor(tiny_net(), ["c1"], weights="IMAGENET1K_V1").fit(images)
    listed = tmp_path / "list.pt"
    torch.save([1, 2], listed)
    with pytest.raises(ValueError, match="not a state_dict"):
        FeatureExtractor(tiny_net(), ["c1"], weights=listed).fit(images)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="torch.load"):
        FeatureExtractor(tiny_net(), ["c1"], weights=garbage).fit(images)


def test_weight_name_without_network(monkeypatch, tmp_path, images):
    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no cached weights
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    for name in ("IMAGENET1K_V1", "SqueezeNet1_1_Weights.DEFAULT"):
        fe = FeatureExtractor("squeezenet1_1", ["features.3"], weights=name)
        with pytest.raises(ValueError, match="without network access.*state_dict"):
            fe.fit(images)


@pytest.mark.parametrize(
    "weights", ["IMAGENET9K_V1", "ResNet50_Weights.IMAGENET1K_V1", "resnet18.IMAGENET1K_V1"]
)
def test_unknown_weight_name(weights, images):
    with pytest.raises(ValueError, match="unknown weights.*ResNet18_Weights"):
        FeatureExtractor("resnet18", weights=weights).fit(images)


# -------------------------------------------------------------------- other errors
def test_unknown_backbone_and_layers(images):
    with pytest.raises(ValueError, match="unknown backbone 'resnet81'.*resnet18.*list_models"):
        FeatureExtractor("resnet81").fit(images)
    with pytest.raises(ValueError, match="no module named 'layr2'.*'layer2'"):
        FeatureExtractor("resnet18", ["layer1", "layr2"], random_state=0).fit(images)
    with pytest.raises(ValueError, match="only for ResNet-style"):
        FeatureExtractor(tiny_net(), normalize=False).fit(images)
    with pytest.raises(ValueError, match="more than once"):
        FeatureExtractor(tiny_net(), ["c1", "c1"]).fit(images)
    with pytest.raises(ValueError, match="empty"):
        FeatureExtractor(tiny_net(), []).fit(images)
    with pytest.raises(TypeError, match="module names"):
        FeatureExtractor(tiny_net(), ["c1", 2]).fit(images)
    with pytest.raises(InvalidParameterError, match="layers"):
        FeatureExtractor(tiny_net(), "c1").fit(images)
    with pytest.raises(InvalidParameterError, match="batch_size"):
        FeatureExtractor(tiny_net(), ["c1"], batch_size=0).fit(images)


class _Partial(nn.Module):
    """tiny_net, then a flatten; ``unused`` is registered but never called."""

    def __init__(self):
        super().__init__()
        self.body, self.flat, self.unused = tiny_net(), nn.Flatten(), nn.Identity()

    def forward(self, x):
        return self.flat(self.body(x))


@pytest.mark.parametrize(
    "layer, match", [("flat", "gave \\(1, 80\\)"), ("unused", "was not called")]
)
def test_layer_without_feature_map(images, layer, match):
    fe = FeatureExtractor(_Partial(), ["body.c1", layer], normalize=False)
    with pytest.raises(ValueError, match=f"{layer!r} must output a 4-D.*{match}"):
        fe.fit(images[:, :, :16, :16])


@pytest.mark.parametrize(
    "X, match",
    [
        (np.zeros((2, 3, 32)), "must be 4-D"),
        (torch.zeros(3, 32, 32), "must be 4-D"),
        (np.zeros(3), "Expected 2D array"),
        (np.zeros((0, 3, 32, 32)), "0 sample"),
        (torch.zeros(0, 3, 32, 32), "0 samples"),
        (np.full((1, 3, 32, 32), np.nan), "NaN"),
        (torch.full((1, 3, 32, 32), float("inf")), "infinity"),
        (np.zeros((2, 32, 32, 3)), "channels-last.*transpose"),
        (np.zeros((2, 4, 32, 32)), "needs 3 channels"),
    ],
)
def test_bad_input_in_fit(X, match):
    with pytest.raises(ValueError, match=match):
        FeatureExtractor(tiny_net(), ["c1"], device="cpu").fit(X)


def test_channel_mismatch_diagnosed_from_first_conv():
    fe = FeatureExtractor(tiny_net(), ["c1"], normalize=False, device="cpu")
    with pytest.raises(ValueError, match="channels.*first convolution takes 3.*transpose"):
        fe.fit(np.zeros((2, 32, 32, 3)))


def test_bad_input_in_transform(fitted_resnet, images):
    with pytest.raises(ValueError, match="channels-last.*transpose"):
        fitted_resnet.transform(images.transpose(0, 2, 3, 1))
    with pytest.raises(ValueError, match="X has 4 features.*expecting 3"):
        fitted_resnet.transform(np.zeros((1, 4, 32, 32)))
    with pytest.raises(ValueError, match="NaN"):
        fitted_resnet.transform(torch.full((1, 3, 32, 32), float("nan")))


def test_device_errors(images):
    with pytest.raises(ValueError, match="unknown device"):
        FeatureExtractor(tiny_net(), ["c1"], device="gpu").fit(images)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="not available"):
            FeatureExtractor(tiny_net(), ["c1"], device="cuda").fit(images)


def test_device_results_match_cpu(device, images):
    net, layers = tiny_net(), ["c1", "c3"]
    X = images[:, :, :16, :16]
    expected = FeatureExtractor(net, layers, device="cpu").fit(X).transform(X)
    fe = FeatureExtractor(net, layers, device=device).fit(X)
    # TF32 convolutions on recent GPUs agree with the CPU to about 1e-3
    assert_allclose(fe.transform(torch.from_numpy(X).to(device)), expected, atol=2e-3)
    assert next(fe.model_.parameters()).device.type == "cpu"
    assert "_device_cache" not in pickle.loads(pickle.dumps(fe)).__dict__


def test_verbose_progress_bar(images, capsys):
    fe = FeatureExtractor(tiny_net(), ["c1"], verbose=True, batch_size=2, device="cpu")
    fe.fit(images).transform(images)
    assert "FeatureExtractor" in capsys.readouterr().err


@pytest.mark.slow  # a fresh interpreter imports torch
def test_import_without_torchvision_or_timm():
    code = (
        "import sys; sys.modules['torchvision'] = sys.modules['timm'] = None\n"
        "import numpy as np, torch, skanomaly.features as f\n"
        "X = np.zeros((1, 3, 8, 8), np.float32)\n"
        "f.FeatureExtractor(torch.nn.Sequential(torch.nn.Conv2d(3, 2, 1)), ['0']).fit(X)\n"
        "for name in ('resnet18', 'timm/tf_efficientnet_lite0'):\n"
        "    try:\n        f.FeatureExtractor(name).fit(X)\n"
        "    except ImportError as e:\n        print('ImportError', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "needs torchvision" in out.stdout and "needs timm" in out.stdout
    assert out.stdout.count("ImportError") == 2


@pytest.mark.slow  # a fresh interpreter imports torch
def test_timm_is_imported_only_for_a_timm_backbone():
    code = (
        "import sys, numpy as np, skanomaly, skanomaly.cli, skanomaly.features as f\n"
        "X = np.zeros((1, 3, 32, 32), np.float32)\n"
        "f.FeatureExtractor('resnet18', random_state=0).fit(X)\n"
        "print('timm' in sys.modules)\n"
        "f.FeatureExtractor('timm/tf_efficientnet_lite0', random_state=0).fit(X)\n"
        "print('timm' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "True"]


# --------------------------------------------------------------------------- finite in, finite out

def test_values_beyond_float32_are_refused_not_turned_into_nan(images):
    fe = FeatureExtractor(tiny_net(), ["c1", "c3"], normalize=False, device="cpu").fit(images)
    huge = images.astype(np.float64) * 1e300  # finite float64, infinite in float32
    for X in (huge, torch.from_numpy(huge)):
        with pytest.raises(ValueError, match="values up to 1e\\+300, beyond the float32 range"):
            fe.transform(X)
    with pytest.raises(ValueError, match="beyond the float32 range"):
        FeatureExtractor(tiny_net(), ["c1"], normalize=False, device="cpu").fit(huge)
    # within float32 but overflowing inside the network: named, never NaN features
    with pytest.raises(ValueError, match="NaN or infinity.*expected in \\[0, 1\\]"):
        fe.transform(images * np.float32(3e38))
    # large but harmless values still work, equal to the float32 computation by hand
    scaled = images.astype(np.float64) * 1e3
    assert_allclose(fe.transform(scaled), fe.transform(scaled.astype(np.float32)))


@pytest.mark.parametrize(("shape", "match"), [((1, 3, 0, 8), "0 height \\(axis 2"),
                                              ((1, 3, 8, 0), "0 width \\(axis 3")])
def test_zero_length_spatial_axes_are_named(images, shape, match):
    fe = FeatureExtractor(tiny_net(), ["c1"], normalize=False, device="cpu").fit(images)
    for X in (np.zeros(shape, np.float32), torch.zeros(shape)):
        with pytest.raises(ValueError, match=match):
            fe.transform(X)


def test_images_too_small_for_the_backbone_give_a_value_error(images):
    net = nn.Sequential(nn.Conv2d(3, 2, 5))  # no padding: needs at least 5 x 5
    fe = FeatureExtractor(net, ["0"], normalize=False, device="cpu").fit(images)
    with pytest.raises(ValueError, match="the backbone failed on X\\[0:1\\]"):
        fe.transform(np.zeros((1, 3, 3, 3), np.float32))


# ------------------------------------------------- grayscale and the torch module
def test_grayscale_is_replicated_to_rgb(fitted_resnet, images):
    gray = images[:, :1]
    rgb = np.repeat(gray, 3, axis=1)
    assert_array_equal(fitted_resnet.transform(gray), fitted_resnet.transform(rgb))
    assert_array_equal(fitted_resnet.transform(torch.from_numpy(gray)),
                       fitted_resnet.transform(rgb))
    # fitted on grayscale: counts as 3 channels, takes RGB too
    fe = FeatureExtractor("resnet18", random_state=0, device="cpu").fit(gray)
    assert fe.n_features_in_ == 3 and fe.input_shape_ == (1, 32, 32)
    assert_array_equal(fe.transform(gray), fitted_resnet.transform(rgb))
    # only under normalize=True (RGB backbones): otherwise the channel count is the input's
    with pytest.raises(ValueError, match="expecting 3"):
        FeatureExtractor(tiny_net(), ["c1"], normalize=False, device="cpu").fit(
            images).transform(gray)
    with pytest.raises(ValueError, match="needs 3 channels"):
        FeatureExtractor(tiny_net(), ["c1"], device="cpu").fit(np.zeros((2, 2, 32, 32)))


def test_torch_module_is_transform_and_traceable(fitted_resnet, images):
    module = fitted_resnet._torch_module("cpu")
    assert module is fitted_resnet._torch_module("cpu") and not module.training
    x = torch.from_numpy(images)
    with torch.no_grad():
        assert_array_equal(module(x).numpy(), fitted_resnet.transform(images))
    # the backbone is cut after layer3: later modules are gone; each batch norm is folded
    # into its convolution (w * gamma / sqrt(var + eps), by hand here), model_ untouched
    backbone = module.backbone
    assert isinstance(backbone.layer4, nn.Identity) and isinstance(backbone.fc, nn.Identity)
    assert isinstance(fitted_resnet.model_.layer4, nn.Sequential)
    block, original = backbone.layer3[0], fitted_resnet.model_.layer3[0]
    assert isinstance(block.bn1, nn.Identity) and isinstance(block.downsample[1], nn.Identity)
    assert isinstance(original.bn1, nn.BatchNorm2d)
    bn = original.bn1
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    assert_allclose(block.conv1.weight.detach().numpy(),
                    (original.conv1.weight * scale[:, None, None, None]).detach().numpy(),
                    rtol=1e-6, atol=1e-7)
    assert_allclose(block.conv1.bias.detach().numpy(),
                    (bn.bias - bn.running_mean * scale).detach().numpy(), rtol=1e-6, atol=1e-7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch >= 2.9 deprecates torch.jit.trace
        traced = torch.jit.trace(copy.deepcopy(module), x[:2])
    with torch.no_grad():
        assert_allclose(traced(x).numpy(), fitted_resnet.transform(images), rtol=1e-6,
                        atol=1e-6)


def test_truncation_keeps_a_module_read_by_another():
    class Tied(nn.Module):  # head is never called, but its weight is read before body
        def __init__(self):
            super().__init__()
            self.head = nn.Conv2d(3, 4, 3, padding=1)
            self.body = nn.Conv2d(4, 2, 3, padding=1)

        def forward(self, x):
            return self.body(torch.nn.functional.conv2d(x, self.head.weight, padding=1))

    net = Tied()
    x = np.random.default_rng(4).random((2, 3, 8, 8), dtype=np.float32)
    fe = FeatureExtractor(net, ["body"], normalize=False, device="cpu").fit(x)
    assert fe._torch_module().backbone is fe.model_  # the trimmed copy failed: kept whole
    with torch.no_grad():
        assert_allclose(fe.transform(x), net(torch.from_numpy(x)).numpy(), rtol=1e-6)


def test_features_do_not_depend_on_the_input_memory_layout():
    # a stack of transposed HWC images is channels-last in memory; convolutions choose
    # their kernels by layout, so without a copy to one layout the features differed
    # (by ~6e-6 here) from those of the same pixels in C order
    rng = np.random.default_rng(0)
    hwc = rng.random((4, 32, 32, 3)).astype(np.float32)
    strided = np.stack([image.transpose(2, 0, 1) for image in hwc])
    assert not strided.flags["C_CONTIGUOUS"]
    fe = FeatureExtractor("resnet18", weights=None, layers=("layer1", "layer2"),
                          device="cpu").fit(strided)
    contiguous = np.ascontiguousarray(strided)
    assert_array_equal(fe.transform(strided), fe.transform(contiguous))
    as_tensor = torch.from_numpy(contiguous).to(memory_format=torch.channels_last)
    assert_array_equal(fe.transform(as_tensor), fe.transform(contiguous))


def test_backbone_built_again_is_an_equal_independent_copy():
    import torchvision

    from skanomaly.features.backbones import build_backbone

    state = torch.random.get_rng_state()
    first = build_backbone("resnet18", None, 3)
    again = build_backbone("resnet18", None, 3)  # the copy kept from the first build
    assert again is not first
    for (name, a), (other, b) in zip(first.state_dict().items(),
                                     again.state_dict().items()):
        assert name == other and torch.equal(a, b)
        assert a.numel() == 0 or a.data_ptr() != b.data_ptr()
    with torch.no_grad():
        first.conv1.weight.zero_()  # a caller's changes reach no later build
    assert torch.equal(build_backbone("resnet18", None, 3).conv1.weight, again.conv1.weight)
    with torch.random.fork_rng(devices=[]):  # independent reference: torchvision, seeded
        torch.manual_seed(3)
        reference = torchvision.models.resnet18()
    assert torch.equal(reference.layer3[1].conv2.weight, again.layer3[1].conv2.weight)
    assert not torch.equal(build_backbone("resnet18", None, 4).conv1.weight,
                           again.conv1.weight)
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched
