"""FeatureExtractor on timm backbones: ``"timm/<architecture>"``, layers named as timm
names its modules. References are forward passes written out stage by stage."""

from __future__ import annotations

import pickle
import sys

import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose, assert_array_equal

from skanomaly.features import FeatureExtractor
from skanomaly.features.extractor import split_backbone

timm = pytest.importorskip("timm")

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32).reshape(1, 3, 1, 1)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32).reshape(1, 3, 1, 1)


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).random((3, 3, 32, 32), dtype=np.float32)


@pytest.fixture(scope="module")
def fitted(images):
    return FeatureExtractor("timm/tf_efficientnet_lite0", ["blocks.1", "blocks.3"],
                            random_state=0, device="cpu").fit(images)


def nearest(a, size):
    rows = np.arange(size) * a.shape[2] // size
    cols = np.arange(size) * a.shape[3] // size
    return a[:, :, rows][:, :, :, cols]


def test_timm_model_by_name_matches_stagewise_forward(fitted, images):
    m = fitted.model_
    assert type(m).__module__.startswith("timm.")
    with torch.no_grad():
        h = m.bn1(m.conv_stem(torch.from_numpy((images - MEAN) / STD)))
        b1 = m.blocks[1](m.blocks[0](h))
        b3 = m.blocks[3](m.blocks[2](b1))
    expected = np.concatenate([b1.numpy(), nearest(b3.numpy(), b1.shape[-1])], axis=1)
    assert fitted.feature_shape_ == (24 + 80, 8, 8)
    assert_allclose(fitted.transform(images), expected, rtol=1e-5, atol=1e-5)


def test_timm_random_init_is_seeded_and_leaves_global_rng_alone(fitted, images):
    torch_state = torch.get_rng_state()
    same = FeatureExtractor("timm/tf_efficientnet_lite0", ["blocks.1", "blocks.3"],
                            random_state=0, device="cpu").fit(images)
    other = FeatureExtractor("timm/tf_efficientnet_lite0", ["blocks.1", "blocks.3"],
                             random_state=1, device="cpu").fit(images)
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert_array_equal(same.transform(images), fitted.transform(images))
    assert not np.allclose(other.transform(images), fitted.transform(images))


def test_default_layers_of_efficientnet_lite0(images):
    fe = FeatureExtractor("timm/tf_efficientnet_lite0", random_state=0).fit(images)
    assert fe.layers_ == ("blocks.1", "blocks.2", "blocks.3")
    assert fe.feature_shape_ == (24 + 40 + 80, 8, 8)


def test_other_timm_architecture_and_state_dict_file(images, tmp_path):
    fe = FeatureExtractor("timm/resnet10t", ["layer1", "layer2"], random_state=0,
                          device="cpu").fit(images)
    path = tmp_path / "resnet10t.pt"
    torch.save(fe.model_.state_dict(), path)
    loaded = FeatureExtractor("timm/resnet10t", ["layer1", "layer2"], weights=str(path),
                              random_state=5, device="cpu").fit(images)
    assert_array_equal(loaded.transform(images), fe.transform(images))


def test_torchvision_stays_the_default_and_takes_a_prefix(images):
    assert FeatureExtractor().backbone == "resnet18"
    bare = FeatureExtractor("resnet18", random_state=0).fit(images)
    prefixed = FeatureExtractor("torchvision/resnet18", random_state=0).fit(images)
    assert type(prefixed.model_).__module__.startswith("torchvision.")
    assert_array_equal(prefixed.transform(images), bare.transform(images))


def test_pickle_round_trip(fitted, images):
    assert_array_equal(pickle.loads(pickle.dumps(fitted)).transform(images),
                       fitted.transform(images))


def test_split_backbone():
    assert split_backbone("timm/convnext_atto") == ("timm", "convnext_atto")
    assert split_backbone("torchvision/resnet18") == ("torchvision", "resnet18")
    assert split_backbone("wide_resnet50_2") == ("torchvision", "wide_resnet50_2")


@pytest.mark.parametrize(
    "backbone, layers, match",
    [
        ("timm/tf_efficientnet_lite9", None,
         "unknown backbone 'timm/tf_efficientnet_lite9'; did you mean "
         "timm/tf_efficientnet_lite\\d"),
        ("tim/resnet18", None, "unknown library 'tim'.*did you mean 'timm/resnet18'"),
        ("timm/", None, "names no model"),
        ("timm/tf_efficientnet_lite0", ["block.2"],
         "no module named 'block.2'. Did you mean 'blocks.2'.*blocks.1 \\(24 channels, "
         "stride 4\\)"),
        ("timm/mobilenetv3_small_050", None, "layers=None picks layers only for.*feature stages"),
    ],
)
def test_unknown_names_get_suggestions(backbone, layers, match, images):
    with pytest.raises(ValueError, match=match):
        FeatureExtractor(backbone, layers, random_state=0).fit(images)


@pytest.mark.parametrize("weights", ["IMAGENET1K_V1", "in1k"])
def test_unknown_weights_of_a_timm_backbone(weights, images):
    with pytest.raises(ValueError, match=f"unknown weights '{weights}'.*efficientnet-lite0"):
        FeatureExtractor("timm/tf_efficientnet_lite0", weights=weights).fit(images)


def test_without_timm_installed(monkeypatch, images):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError
    with pytest.raises(ImportError, match="needs timm.*pip install timm"):
        FeatureExtractor("timm/tf_efficientnet_lite0").fit(images)
    # torchvision backbones and modules need no timm
    FeatureExtractor("resnet18", ["layer1"], random_state=0).fit(images)


def test_batch_norm_act_is_folded_into_the_convolution(images):
    # timm's BatchNormAct2d (batch norm, then its activation) after a Conv2d or
    # Conv2dSame folds into the convolution; the activation stays as a module. Running
    # statistics are drawn at random so that the fold is not the identity.
    det = FeatureExtractor("timm/tf_efficientnet_lite0", ["blocks.1", "blocks.3"],
                           random_state=0, device="cpu").fit(images)
    gen = torch.Generator().manual_seed(0)
    for module in det.model_.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
            module.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            module.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
            module.bias.data.copy_(torch.randn(n, generator=gen) * 0.1)
    backbone = det._torch_module("cpu").backbone
    left = [type(m).__name__ for m in backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert left == []
    stem, bn = backbone.conv_stem, det.model_.bn1
    assert type(stem).__name__ == "Conv2dSame" and isinstance(backbone.bn1, torch.nn.Sequential)
    assert isinstance(backbone.bn1[1], type(bn.act))
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    assert_allclose(stem.weight.detach().numpy(),
                    (det.model_.conv_stem.weight * scale[:, None, None, None]).detach().numpy(),
                    rtol=1e-6, atol=1e-7)
    assert_allclose(stem.bias.detach().numpy(),
                    (bn.bias - bn.running_mean * scale).detach().numpy(), rtol=1e-6, atol=1e-7)
    m = det.model_
    with torch.no_grad():  # the unfolded model, stage by stage
        h = m.bn1(m.conv_stem(torch.from_numpy((images - MEAN) / STD)))
        b1 = m.blocks[1](m.blocks[0](h))
        b3 = m.blocks[3](m.blocks[2](b1))
    expected = np.concatenate([b1.numpy(), nearest(b3.numpy(), b1.shape[-1])], axis=1)
    assert_allclose(det.transform(images), expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
