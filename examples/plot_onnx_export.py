"""
Export to ONNX and score with onnxruntime
=========================================

A fitted pipeline (feature extractor and detector) becomes one ONNX file with
:func:`skanomaly.export.export`: images in, anomaly scores and anomaly maps out. The
threshold travels in the file's metadata. onnxruntime then scores images without
skanomaly or PyTorch, and gives the estimator's numbers.
"""

# %%
# Fit, and export.
import json
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import onnxruntime

from skanomaly import PaDiMDetector, make_anomaly_pipeline
from skanomaly.datasets import load_textures
from skanomaly.export import export
from skanomaly.features import FeatureExtractor

data = load_textures("brick", n_train=40, n_test=16, image_size=64, random_state=0)
model = make_anomaly_pipeline(
    FeatureExtractor("timm/tf_efficientnet_lite0", weights="efficientnet-lite0-imagenet"),
    PaDiMDetector(n_features=50, random_state=0),
).fit(data.X_train)

workdir = tempfile.TemporaryDirectory()
path = Path(workdir.name) / "padim.onnx"
metadata = export(model, path, example_input=data.X_test[:2])
print(f"{path.name}: {path.stat().st_size / 2**20:.1f} MiB, outputs {metadata['outputs']}, "
      f"input (n, {', '.join(map(str, metadata['input_shape']))}), opset {metadata['opset']}")

# %%
# Score with onnxruntime. The threshold is the anomaly score above which an image is an
# outlier (``-offset_``), stored as metadata beside the graph.
session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
onnx_scores, onnx_maps = session.run(None, {"input": data.X_test})
stored = session.get_modelmeta().custom_metadata_map
threshold = float(stored["threshold"])
print("metadata keys:", sorted(json.loads(stored["skanomaly"]))[:8], "...")
onnx_labels = np.where(onnx_scores > threshold, -1, 1)

# %%
# Parity with the estimator: scores, maps and labels.
scores = -model.score_samples(data.X_test)
maps = model.anomaly_map(data.X_test)
labels = model.predict(data.X_test)
print(f"threshold  {threshold:.6f} (estimator: {-model[-1].offset_:.6f})")
print(f"scores     largest relative difference "
      f"{np.max(np.abs(onnx_scores - scores) / np.abs(scores)):.1e}")
print(f"maps       largest absolute difference {np.max(np.abs(onnx_maps - maps)):.1e} "
      f"(maps range {maps.min():.1f} to {maps.max():.1f})")
print(f"labels     {np.sum(onnx_labels == labels)} of {len(labels)} equal")

# %%
# The same defective image, mapped by the estimator and by onnxruntime.
i = int(np.flatnonzero(data.y_test == -1)[0])
fig, axes = plt.subplots(1, 3, figsize=(9, 3.2), layout="constrained")
axes[0].imshow(data.X_test[i].transpose(1, 2, 0))
axes[0].contour(data.masks_test[i], levels=[0.5], colors="white", linewidths=1)
axes[0].set_title(f"test image ({data.defect_type_test[i]})")
for ax, m, title in [(axes[1], maps[i], "model.anomaly_map"),
                     (axes[2], onnx_maps[i], "onnxruntime")]:
    heat = ax.imshow(m, cmap="jet", vmin=maps[i].min(), vmax=maps[i].max())
    ax.set_title(title)
for ax in axes:
    ax.axis("off")
fig.colorbar(heat, ax=axes[1:], shrink=0.8, label="anomaly score")
plt.show()
workdir.cleanup()
