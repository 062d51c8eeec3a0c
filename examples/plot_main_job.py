"""
The main job: one command
=========================

``skanomaly`` without a subcommand fits a detector on normal images, scores test
images and writes scores, heatmaps and metrics. With no folders given it runs on
crops of scikit-image's brick texture with synthetic defects, through an
EfficientNet-Lite0 whose ImageNet weights ship in an installed package. This is the
command of :doc:`/getting_started`, run as a user runs it, then its outputs read back.
"""

# %%
# Run the command. In a shell: ``skanomaly --output-dir skanomaly-output``; here with
# fewer images than the default 100 training and 60 test crops, to keep the
# documentation's build short.
import csv
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt

workdir = tempfile.TemporaryDirectory()
output = Path(workdir.name) / "skanomaly-output"
command = ["skanomaly", "--n-train", "60", "--n-test", "24", "--output-dir", str(output)]
run = subprocess.run([sys.executable, "-m", *command], capture_output=True, text=True,
                     check=True)
print(run.stdout)

# %%
# ``metrics.json``: the metrics, and how the model was made and its threshold set.
metrics = json.loads((output / "metrics.json").read_text())
print(json.dumps(metrics["metrics"], indent=1))
print({key: metrics[key] for key in ("detector", "backbone", "layers", "weights",
                                     "image_size", "n_fit", "n_calibration", "threshold")})

# %%
# ``scores.csv``: one row per test image, with its anomaly score (higher = more
# anomalous) and prediction (+1 normal, -1 anomalous).
with open(output / "scores.csv", newline="") as f:
    rows = list(csv.DictReader(f))
for row in rows[:6]:
    print({key: row[key] for key in ("image", "defect_type", "anomaly_score", "prediction")})

# %%
# ``heatmaps/``: each test image under its anomaly map, the defect outlined. Here the
# first three defective images and the first good one.
shown = [r for r in rows if r["defect_type"] != "good"][:3]
shown += [r for r in rows if r["defect_type"] == "good"][:1]
fig, axes = plt.subplots(1, len(shown), figsize=(13, 3.4), layout="constrained")
for ax, row in zip(axes, shown):
    ax.imshow(plt.imread(output / row["heatmap"]))
    ax.axis("off")
plt.show()
workdir.cleanup()
