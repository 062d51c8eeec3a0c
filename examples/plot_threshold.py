"""
A threshold that holds on new data
==================================

``contamination`` is the share of NEW normal samples that ``predict`` flags. This
example measures that share on normal images a detector has never seen, for three ways
of setting the threshold:

* **in-sample**: the ``contamination`` quantile of the training images' own scores,
  the threshold a detector gets from scoring its training set. These scores are
  optimistic: a training patch is its own nearest neighbour, a training point counts in
  its own density, a mean and covariance are pulled towards the samples they were
  estimated from;
* **offset_ from fit**: what skanomaly's ``fit`` sets, from out-of-sample scores of the
  training images (leave-one-out, leave-one-image-out or cross-fitting; the fitted
  ``calibration_`` says which);
* **calibrate**: :func:`skanomaly.calibrate` on held-out normal images.

The images are normal crops of the bundled brick texture, all drawn from the same half
of it, split into 60 to fit, 40 held out and 160 new ones.
"""

# %%
import matplotlib.pyplot as plt
import numpy as np
from sklearn.base import clone

from skanomaly import (DFKDEDetector, DFMDetector, GaussianDetector, PaDiMDetector,
                       PatchCoreDetector, calibrate)
from skanomaly.datasets import load_textures
from skanomaly.features import FeatureExtractor

crops = load_textures("brick", n_train=260, n_test=1, image_size=64, random_state=0).X_train
extractor = FeatureExtractor("timm/tf_efficientnet_lite0", ["blocks.2", "blocks.3"],
                             weights="efficientnet-lite0-imagenet")
features = extractor.fit_transform(crops)          # (260, 120, 8, 8)
F_fit, F_held_out, F_new = features[:60], features[60:100], features[100:]

# PaDiM, PatchCore and DFM take the feature maps, the Gaussian pooled vectors and
# DFKDE pools them itself.
pooled = lambda F: F.mean(axis=(2, 3))  # noqa: E731
detectors = {
    "Gaussian": (GaussianDetector(), pooled),
    "PaDiM": (PaDiMDetector(random_state=0), None),
    "PatchCore": (PatchCoreDetector(random_state=0), None),
    "DFM": (DFMDetector(), None),
    "DFKDE": (DFKDEDetector(random_state=0), None),
}
contaminations = [0.05, 0.1, 0.2]

# %%
# For every detector and ``contamination``: fit, then the share of the new normal
# images flagged under each threshold.
rates = {method: {name: [] for name in detectors}
         for method in ("in-sample", "offset_ from fit", "calibrate")}
for name, (detector, prepare) in detectors.items():
    fit, held_out, new = (prepare(F) if prepare else F for F in (F_fit, F_held_out, F_new))
    for c in contaminations:
        model = clone(detector).set_params(contamination=c).fit(fit)
        in_sample = np.quantile(model.score_samples(fit), c)
        rates["in-sample"][name].append(np.mean(model.score_samples(new) < in_sample))
        rates["offset_ from fit"][name].append(np.mean(model.predict(new) == -1))
        how = model.calibration_
        calibrate(model, held_out)                   # offset_ from held-out normals
        rates["calibrate"][name].append(np.mean(model.predict(new) == -1))
    print(f"{name:<10} fit sets offset_ by {how}")

# %%
# The target is the dotted diagonal: a share of new normals flagged equal to
# ``contamination``.
fig, axes = plt.subplots(1, 3, figsize=(11, 3.8), sharey=True, layout="constrained")
for ax, (method, by_detector) in zip(axes, rates.items()):
    for name, r in by_detector.items():
        ax.plot(contaminations, r, "o-", ms=4, label=name)
    ax.plot([0, 0.25], [0, 0.25], color="black", lw=0.8, ls=":", label="target")
    ax.set(title=method, xlabel="contamination", xlim=(0, 0.25), ylim=(-0.02, 1.02))
axes[0].set_ylabel("share of new normals flagged")
axes[-1].legend(fontsize=8)
plt.show()

# %%
# The numbers (160 new images: one image is 0.006):
print(f"{'detector':<10}{'contamination':>14}" + "".join(f"{m:>18}" for m in rates))
for name in detectors:
    for i, c in enumerate(contaminations):
        print(f"{name:<10}{c:>14}" + "".join(f"{rates[m][name][i]:>18.3f}" for m in rates))

# %%
# An in-sample threshold flags (nearly) every new image here, for every detector: with
# 120 feature channels and 60 training images, each detector scores its training
# images as more normal than (nearly) any new one. The ``offset_`` that ``fit`` sets and a held-out
# calibration land near the target, within the noise of 40 held-out and 160 new
# images. See :doc:`/user_guide/thresholds`.
