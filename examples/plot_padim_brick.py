"""
PaDiM on the bundled brick texture
==================================

Fit PaDiM on crops of scikit-image's brick texture, score test crops that carry
synthetic defects, and draw the anomaly maps over the images with the true defects
outlined. The features come from an ImageNet-pretrained EfficientNet-Lite0 whose weights
ship in an installed package, so nothing is downloaded.
"""

# %%
# The data: normal training crops from the top half of the texture, test crops from the
# bottom half, half of them with a pasted patch, a scratch or a colour blotch and a
# pixel mask of what was changed.
import matplotlib.pyplot as plt
import numpy as np

from skanomaly import PaDiMDetector, make_anomaly_pipeline
from skanomaly.datasets import load_textures
from skanomaly.features import FeatureExtractor
from skanomaly.metrics import image_auroc, pixel_auroc

data = load_textures("brick", n_train=60, n_test=24, image_size=96, random_state=0)
print(data.X_train.shape, data.X_test.shape, np.unique(data.defect_type_test))

# %%
# The model: a feature extractor and the detector in one scikit-learn pipeline.
# ``fit`` sees normal images only, and sets the threshold so that ``predict`` flags
# about ``contamination`` (10 %) of new normal images like the training ones.
model = make_anomaly_pipeline(
    FeatureExtractor("timm/tf_efficientnet_lite0", weights="efficientnet-lite0-imagenet"),
    PaDiMDetector(n_features=100, random_state=0),
)
model.fit(data.X_train)

# %%
# Scores and maps. ``score_samples`` is higher for more normal images, as in
# scikit-learn; anomaly maps and the metrics take anomaly scores (higher = more
# anomalous).
anomaly_scores = -model.score_samples(data.X_test)
maps = model.anomaly_map(data.X_test)  # (n_test, 96, 96), at the image size
print(f"image AUROC {image_auroc(data.y_test, anomaly_scores):.3f}, "
      f"pixel AUROC {pixel_auroc(data.masks_test, maps):.3f}")
print(f"predicted anomalous: {(model.predict(data.X_test) == -1).sum()} of "
      f"{len(data.X_test)} ({(data.y_test == -1).sum()} have a defect)")

# %%
# More than 10 % of the good test crops are flagged: they come from the bottom half of
# the texture, whose normal crops score higher than the top half's training crops.
# The ranking (AUROC) is unaffected; for a threshold, hold out normal images like
# the ones the model will see (:doc:`/auto_examples/plot_threshold`).
#
# Heatmaps over the images, on one colour scale, with the defects outlined in white.
shown = np.r_[np.flatnonzero(data.y_test == -1)[:6], np.flatnonzero(data.y_test == 1)[:2]]
vmin, vmax = np.percentile(maps, [1, 99.5])
fig, axes = plt.subplots(2, 4, figsize=(10, 5.4), layout="constrained")
for ax, i in zip(axes.flat, shown):
    ax.imshow(data.X_test[i].transpose(1, 2, 0))
    heat = ax.imshow(maps[i], cmap="jet", alpha=0.45, vmin=vmin, vmax=vmax)
    if data.masks_test[i].any():
        ax.contour(data.masks_test[i], levels=[0.5], colors="white", linewidths=1.2)
    ax.set_title(f"{data.defect_type_test[i]}: score {anomaly_scores[i]:.0f}", fontsize=9)
    ax.axis("off")
fig.colorbar(heat, ax=axes, shrink=0.8, label="anomaly score")
plt.show()
