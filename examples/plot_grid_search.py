"""
Tuning a detector with GridSearchCV
===================================

skanomaly's detectors are scikit-learn estimators, so
:class:`~sklearn.model_selection.GridSearchCV` tunes them. Anomaly detectors are fitted
on normal samples only and judged on a labelled mix, so the cross-validation splits are
written out: each fold fits on a part of the normal images and scores a part of the
labelled ones. ``scoring="roc_auc"`` works with labels +1 (normal) / -1 (anomaly):
ROC AUC takes the greater label, +1, as positive, and ``decision_function`` is higher
for normal samples, so the two signs agree.

The data are crops of the bundled grass texture, harder than brick, so that the
parameters matter. Features are extracted once, outside the search; a whole
:class:`~skanomaly.AnomalyPipeline` can be searched as well (parameters
``padimdetector__n_features`` and so on), at the cost of extracting features in every
fit.
"""

# %%
import matplotlib.pyplot as plt
import numpy as np
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV, KFold, StratifiedKFold

from skanomaly import PaDiMDetector
from skanomaly.datasets import load_textures
from skanomaly.features import FeatureExtractor
from skanomaly.metrics import image_auroc

search_data = load_textures("grass", n_train=60, n_test=60, image_size=64, random_state=0)
test_data = load_textures("grass", n_train=1, n_test=60, image_size=64, random_state=1)
extractor = FeatureExtractor("timm/tf_efficientnet_lite0", ["blocks.2", "blocks.3"],
                             weights="efficientnet-lite0-imagenet").fit(search_data.X_train)
normal = extractor.transform(search_data.X_train)    # 60 normal images
labelled = extractor.transform(search_data.X_test)   # 60 images, 30 with a defect
X = np.concatenate([normal, labelled])
y = np.concatenate([np.ones(len(normal), int), search_data.y_test])

# %%
# Three folds: fit on two thirds of the normal images, score a third of the labelled
# ones (stratified, so each holds both classes).
n = len(normal)
normal_folds = KFold(3, shuffle=True, random_state=0).split(np.arange(n))
labelled_folds = StratifiedKFold(3, shuffle=True, random_state=0).split(
    labelled, search_data.y_test)
cv = [(fit_idx, n + score_idx)
      for (fit_idx, _), (_, score_idx) in zip(normal_folds, labelled_folds)]

param_grid = {"n_features": [10, 30, 100], "reg": [0.001, 0.1, 10.0]}
search = GridSearchCV(PaDiMDetector(random_state=0), param_grid, scoring="roc_auc",
                      cv=cv, refit=False)
search.fit(X, y)
print(f"{len(search.cv_results_['params'])} candidates x {len(cv)} folds")
print("best:", search.best_params_, f"mean AUROC {search.best_score_:.3f}")

# %%
# Mean validation AUROC over the grid.
scores = search.cv_results_["mean_test_score"].reshape(3, 3)  # n_features x reg
fig, ax = plt.subplots(figsize=(5, 3.6), layout="constrained")
image = ax.imshow(scores, cmap="viridis")
ax.set(xticks=range(3), xticklabels=param_grid["reg"], xlabel="reg",
       yticks=range(3), yticklabels=param_grid["n_features"], ylabel="n_features",
       title="PaDiM on grass: mean validation AUROC")
for (i, j), value in np.ndenumerate(scores):
    dark = value < (scores.min() + scores.max()) / 2   # white text on dark cells
    ax.text(j, i, f"{value:.3f}", ha="center", va="center",
            color="white" if dark else "black", fontsize=9)
fig.colorbar(image, ax=ax)
plt.show()

# %%
# ``refit=False`` above: scikit-learn's refit would fit the best detector on all of
# ``X``, anomalies included. Fit it on the normal images instead, and check it on
# images the search never saw:
best = clone(PaDiMDetector(random_state=0)).set_params(**search.best_params_).fit(normal)
default = PaDiMDetector(random_state=0).fit(normal)
X_test = extractor.transform(test_data.X_test)
for name, detector in [("best", best), ("default", default)]:
    auroc = image_auroc(test_data.y_test, -detector.score_samples(X_test))
    n_features = detector.n_features or "all"
    print(f"{name:<8} n_features={n_features!s:<4} reg={detector.reg:<6} "
          f"test AUROC {auroc:.3f}")
