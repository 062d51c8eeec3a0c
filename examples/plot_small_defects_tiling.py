"""
Small defects: tiles at native resolution against a resized image
=================================================================

A scratch one or two pixels wide on a 192-pixel image all but vanishes when the image is
resized to the small square that a pipeline with one fixed input size takes. Tiling
(``tile_size``, ``tile_stride``) cuts each image into tiles at its native resolution,
each a sample for the backbone and the detector, and stitches the tiles' maps back at
the image size; ``tile_resize`` enlarges each tile before the backbone, so that its
stride-8 features fall every few image pixels. The tiled maps are blurred by 2 pixels
(``sigma``, the command line's ``--map-sigma`` with ``--tile-size``), not anomalib's 4,
to keep a thin scratch sharp. Measured on 40 test crops of each bundled texture: see
:doc:`/user_guide/tiling`.
"""

# %%
# The data: normal 192-px crops of the brick texture for training, and test crops in
# which we draw scratches 8 to 12 px long and 1 or 2 px wide (dark or bright), with
# their masks.
import matplotlib.pyplot as plt
import numpy as np

from skanomaly import PaDiMDetector, make_anomaly_pipeline
from skanomaly.datasets import load_textures
from skanomaly.features import FeatureExtractor
from skanomaly.metrics import pixel_auroc

data = load_textures("brick", n_train=24, n_test=8, image_size=192, defect_fraction=0.0,
                     random_state=0)
X_train, X_test = data.X_train, data.X_test.copy()
rng = np.random.default_rng(0)
masks = np.zeros((len(X_test), 192, 192), dtype=bool)
for i in range(len(X_test)):
    row, col = rng.integers(30, 160, size=2)
    length, width = rng.integers(8, 13), rng.integers(1, 3)
    masks[i, row:row + width, col:col + length] = True  # a horizontal scratch
    X_test[i][:, masks[i]] = 0.05 if i % 2 else 0.95
print(X_train.shape, X_test.shape, "scratch pixels per image:", masks.sum((1, 2)))


def extractor():
    return FeatureExtractor("timm/tf_efficientnet_lite0", ["blocks.1", "blocks.2", "blocks.3"],
                            weights="efficientnet-lite0-imagenet", random_state=0)


# %%
# Two pipelines with the same backbone and detector. The first takes the images
# resized to 64 px; the second cuts 64-px tiles at stride 48 (a 4 x 4 grid of
# overlapping tiles per 192-px image, the last ones ending at the border), each
# enlarged to 128 px before the backbone.
def resize(X, size=64):
    import torch

    return torch.nn.functional.interpolate(
        torch.from_numpy(X), size=(size, size), mode="bilinear", antialias=True,
        align_corners=False).numpy()


resized = make_anomaly_pipeline(extractor(), PaDiMDetector(n_features=100, random_state=0))
resized.fit(resize(X_train))
tiled = make_anomaly_pipeline(extractor(), PaDiMDetector(n_features=100, random_state=0),
                              tile_size=64, tile_stride=48, tile_resize=128)
tiled.fit(X_train)
print("tiles the detector saw:", tiled[-1].n_samples_seen_, "of shape",
      tiled[-1].input_shape_)

# %%
# Maps at the native 192 px for both (the resized model's maps are upsampled to it),
# and the pixel AUROC of each over the 8 test crops.
maps_resized = resized.anomaly_map(resize(X_test), output_size=192, sigma=2.0)
maps_tiled = tiled.anomaly_map(X_test, sigma=2.0)
print(f"pixel AUROC: resized to 64 px {pixel_auroc(masks, maps_resized):.3f}, "
      f"tiled {pixel_auroc(masks, maps_tiled):.3f}")

# %%
# Each test crop, the resized model's map and the tiled model's map (each map on its
# own colour scale over the 8 crops), the scratch outlined in white.
fig, axes = plt.subplots(3, 4, figsize=(10, 7.8), layout="constrained")
scales = [np.percentile(m, [1, 99.9]) for m in (maps_resized, maps_tiled)]
for j, i in enumerate(range(4)):
    axes[0, j].imshow(X_test[i].transpose(1, 2, 0))
    axes[0, j].set_title(f"test crop {i}")
    for k, (maps, (vmin, vmax), name) in enumerate(
            [(maps_resized, scales[0], "resized 64 px"), (maps_tiled, scales[1], "tiled")]):
        axes[k + 1, j].imshow(maps[i], cmap="jet", vmin=vmin, vmax=vmax)
        axes[k + 1, j].set_title(name)
    for ax in axes[:, j]:
        ax.contour(masks[i], levels=[0.5], colors="white", linewidths=1)
        ax.set_axis_off()
plt.show()
