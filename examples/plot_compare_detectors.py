"""
The five detectors against scikit-learn's
=========================================

Every skanomaly detector and three of scikit-learn's outlier detectors
(:class:`~sklearn.ensemble.IsolationForest`,
:class:`~sklearn.neighbors.LocalOutlierFactor`, :class:`~sklearn.svm.OneClassSVM`)
fitted on the same normal samples of two bundled data sets, scored on the same test
samples: ROC curves, then a table of the image AUROC with fit and predict times.

* **Images**: crops of scikit-image's brick texture with synthetic defects, through one
  feature extractor (EfficientNet-Lite0 with packaged ImageNet weights) whose features
  every detector shares. PaDiM, PatchCore and DFM take the feature maps; the Gaussian,
  DFKDE and scikit-learn's detectors take them average-pooled to one vector per image.
* **Tabular**: a sample of river's Shuttle data (9 numeric features; the rare classes
  are the anomalies), standardised. Spatial detectors read ``(n, D)`` input as
  ``(n, D, 1, 1)``: PaDiM is then a Gaussian, PatchCore a nearest-neighbour distance.

The sizes are small so that this runs in seconds; the times are those of this build's
machine, and say little beyond their order of magnitude.
"""

# %%
import time

import matplotlib.pyplot as plt
import numpy as np
from sklearn.ensemble import IsolationForest
from sklearn.metrics import roc_auc_score, roc_curve
from sklearn.neighbors import LocalOutlierFactor
from sklearn.preprocessing import StandardScaler
from sklearn.svm import OneClassSVM

from skanomaly import (DFKDEDetector, DFMDetector, GaussianDetector, PaDiMDetector,
                       PatchCoreDetector)
from skanomaly.datasets import load_shuttle, load_textures
from skanomaly.features import FeatureExtractor


def detectors():
    """Fresh detectors, default parameters apart from seeds; True marks a spatial one."""
    return {
        "PaDiM": (PaDiMDetector(random_state=0), True),
        "PatchCore": (PatchCoreDetector(random_state=0), True),
        "DFM": (DFMDetector(), True),
        "Gaussian": (GaussianDetector(), False),
        "DFKDE": (DFKDEDetector(random_state=0), False),
        "IsolationForest": (IsolationForest(random_state=0), False),
        "LocalOutlierFactor": (LocalOutlierFactor(novelty=True), False),
        "OneClassSVM": (OneClassSVM(), False),
    }


def compare(X_train, X_test, y_test, pooled=None):
    """Fit each detector on ``X_train``; AUROC, fit and predict seconds, ROC curve.

    ``pooled`` turns feature maps into vectors for the non-spatial detectors.
    """
    results = {}
    for name, (detector, spatial) in detectors().items():
        train, test = (X_train, X_test) if spatial or pooled is None else (
            pooled(X_train), pooled(X_test))
        start = time.perf_counter()
        detector.fit(train)
        fitted = time.perf_counter()
        anomaly_score = -detector.score_samples(test)  # every one: higher = more normal
        scored = time.perf_counter()
        results[name] = dict(
            auroc=roc_auc_score(y_test == -1, anomaly_score),
            fit_s=fitted - start, predict_s=scored - fitted,
            roc=roc_curve(y_test == -1, anomaly_score)[:2],
        )
    return results


# %%
# Image data: features are extracted once and shared.
brick = load_textures("brick", n_train=60, n_test=40, image_size=64, random_state=0)
extractor = FeatureExtractor("timm/tf_efficientnet_lite0",
                             weights="efficientnet-lite0-imagenet").fit(brick.X_train)
start = time.perf_counter()
F_train, F_test = extractor.transform(brick.X_train), extractor.transform(brick.X_test)
print(f"features {F_train.shape[1:]} of {len(F_train) + len(F_test)} images "
      f"in {time.perf_counter() - start:.1f} s")
image_results = compare(F_train, F_test, brick.y_test, pooled=lambda F: F.mean(axis=(2, 3)))

# %%
# Tabular data: 2,000 normal training rows, 2,000 test rows.
shuttle = load_shuttle(random_state=0)
rng = np.random.default_rng(0)
train = rng.choice(len(shuttle.X_train), 2000, replace=False)
test = rng.choice(len(shuttle.X_test), 2000, replace=False)
scaler = StandardScaler().fit(shuttle.X_train[train])
tabular_results = compare(scaler.transform(shuttle.X_train[train]),
                          scaler.transform(shuttle.X_test[test]), shuttle.y_test[test])

# %%
# ROC curves (the anomaly class positive).
fig, axes = plt.subplots(1, 2, figsize=(10, 4.6), layout="constrained")
for ax, (title, results) in zip(axes, [("brick crops, 64 px", image_results),
                                       ("Shuttle", tabular_results)]):
    for name, r in results.items():
        skl = name in ("IsolationForest", "LocalOutlierFactor", "OneClassSVM")
        ax.plot(*r["roc"], ls="--" if skl else "-", lw=1.4,
                label=f"{name} ({r['auroc']:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.6)
    ax.set(title=title, xlabel="false-positive rate", ylabel="true-positive rate")
    ax.legend(fontsize=7, loc="lower right", title="AUROC", title_fontsize=7)
plt.show()

# %%
# The table: AUROC, then fit and predict time in seconds (features already extracted).
print(f"{'detector':<20}{'brick AUROC':>12}{'fit s':>8}{'predict s':>10}"
      f"{'Shuttle AUROC':>15}{'fit s':>8}{'predict s':>10}")
for name in image_results:
    im, tab = image_results[name], tabular_results[name]
    print(f"{name:<20}{im['auroc']:>12.3f}{im['fit_s']:>8.3f}{im['predict_s']:>10.3f}"
          f"{tab['auroc']:>15.3f}{tab['fit_s']:>8.3f}{tab['predict_s']:>10.3f}")

# %%
# On the texture, detectors that model each position of the feature map (PaDiM,
# PatchCore, DFM) find small defects that a pooled vector averages away; on a table of
# a few features, scikit-learn's detectors are as good, and the Gaussian and PaDiM are
# among the fastest to fit and score. :doc:`/choosing_a_detector` puts these numbers
# beside memory, streaming and export.
