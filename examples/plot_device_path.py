"""
Tensors on the device through a pipeline
========================================

Give a fused pipeline ``torch.Tensor`` images and it answers in tensors on their device:
the images go through the backbone batch by batch, the features stay tensors (only the
channels the detector keeps), and only scores and maps come out. Numpy in gives numpy
out, with the same values. This example runs on a GPU when there is one and on the CPU
otherwise.
"""

# %%
# The same PatchCore pipeline as in the other examples, on the device at hand. The
# images are a tensor on that device; so are the scores and maps of ``score_and_map``,
# which computes both in one pass.
import matplotlib.pyplot as plt
import numpy as np
import torch

from skanomaly import PatchCoreDetector, make_anomaly_pipeline
from skanomaly.datasets import load_textures
from skanomaly.features import FeatureExtractor

device = "cuda" if torch.cuda.is_available() else "cpu"
data = load_textures("brick", n_train=40, n_test=16, image_size=96, random_state=0)
train = torch.as_tensor(data.X_train, device=device)
test = torch.as_tensor(data.X_test, device=device)

model = make_anomaly_pipeline(
    FeatureExtractor("timm/tf_efficientnet_lite0", weights="efficientnet-lite0-imagenet",
                     device=device),
    PatchCoreDetector(coreset_sampling_ratio=0.1, random_state=0, device=device),
)
model.fit(train)
scores, maps = model.score_and_map(test)
labels = model.predict(test)
print(f"scores: {type(scores).__name__} {scores.dtype} on {scores.device}, "
      f"shape {tuple(scores.shape)}")
print(f"maps:   {type(maps).__name__} {maps.dtype} on {maps.device}, shape {tuple(maps.shape)}")
print(f"labels: {labels.dtype}, {int((labels == -1).sum())} of {len(labels)} flagged, "
      f"{int((data.y_test == -1).sum())} have a defect")

# %%
# More good crops are flagged than ``contamination`` (10 %) suggests: the test crops come
# from the other half of the texture, whose normal crops score higher; hold out normal
# images like the ones the model will see (:doc:`/auto_examples/plot_threshold`).

# %%
# Numpy in, numpy out, equal to the tensor path: the fitted state is the same, and a
# sample's score does not depend on the container or the batch it came in.
numpy_scores, numpy_maps = model.score_and_map(data.X_test)
print(type(numpy_scores).__name__,
      np.array_equal(numpy_scores, scores.cpu().numpy()),
      np.array_equal(numpy_maps, maps.cpu().numpy()))

# %%
# Only the scores and maps leave the device, here to draw them: the anomaly scores
# (``-score_samples``) of good and defective crops, and two maps.
anomaly = -scores.cpu().numpy()
fig, axes = plt.subplots(1, 3, figsize=(10, 3.4), layout="constrained")
axes[0].scatter(np.arange(len(anomaly)), anomaly, c=np.where(data.y_test == -1, "C3", "C0"))
axes[0].set_xlabel("test crop")
axes[0].set_ylabel("anomaly score")
axes[0].set_title("red: defective, blue: good", fontsize=9)
for ax, i in zip(axes[1:], np.flatnonzero(data.y_test == -1)[:2]):
    ax.imshow(data.X_test[i].transpose(1, 2, 0))
    ax.imshow(maps[i].cpu().numpy(), cmap="jet", alpha=0.45)
    ax.contour(data.masks_test[i], levels=[0.5], colors="white", linewidths=1.2)
    ax.set_title(f"{data.defect_type_test[i]}", fontsize=9)
    ax.axis("off")
plt.show()
