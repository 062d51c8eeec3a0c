"""
Streaming a folder, and fitting on a Dask cluster
=================================================

Two ways to fit on more images than fit in memory at once:

* :func:`skanomaly.streaming.partial_fit_images` reads a folder batch by batch, runs
  each batch through the feature extractor and hands the features to the detector's
  ``partial_fit``, so memory stays flat however many images there are;
* ``fit`` on a :class:`dask.array.Array` runs on the workers of a Dask cluster: each
  block is fitted there and only the fitted states travel and merge.

Both give PaDiM the model a one-shot ``fit`` gives (its moments merge exactly).
"""

# %%
# A folder of images: 320 normal brick crops written as PNG files.
import tempfile
from pathlib import Path

import dask
import dask.array as da
import matplotlib.pyplot as plt
import numpy as np
import psutil
from distributed import Client, LocalCluster
from PIL import Image

from skanomaly import PaDiMDetector, make_anomaly_pipeline
from skanomaly.datasets import load_textures
from skanomaly.features import FeatureExtractor
from skanomaly.streaming import find_images, iter_image_batches, partial_fit_images, read_image

workdir = tempfile.TemporaryDirectory()
folder = Path(workdir.name)
crops = load_textures("brick", n_train=320, n_test=1, image_size=64, random_state=0).X_train
for i, crop in enumerate(crops):
    Image.fromarray(np.round(crop.transpose(1, 2, 0) * 255).astype(np.uint8)).save(
        folder / f"brick_{i:03d}.png")
del crops
print(len(find_images(folder)), "images in the folder")


def make_model():
    return make_anomaly_pipeline(
        FeatureExtractor("timm/tf_efficientnet_lite0", weights="efficientnet-lite0-imagenet"),
        PaDiMDetector(n_features=50, random_state=0),
    )


# %%
# Streaming with ``partial_fit``
# ------------------------------
#
# ``partial_fit_images`` takes a folder, or any iterable of batches: here a generator
# that reads the folder and records the process's memory each time the model asks for
# the next batch, that is once the previous one is absorbed.
process = psutil.Process()
images_seen, rss_mib = [], []


def batches_with_memory(batch_size=32):
    seen = 0
    for batch in iter_image_batches(folder, batch_size=batch_size, image_size=64):
        yield batch
        seen += len(batch)
        images_seen.append(seen)
        rss_mib.append(process.memory_info().rss / 2**20)


streamed = partial_fit_images(make_model(), batches_with_memory())
detector = streamed[-1]
print(f"{detector.n_samples_seen_} images seen, threshold from {detector.calibration_!r}")

# %%
# Memory against images seen. For comparison, the features a one-shot ``fit`` holds at
# once (144 channels on a 16 x 16 grid, float32, per image) grow with the images.
feature_mib = 144 * 16 * 16 * 4 / 2**20
fig, ax = plt.subplots(figsize=(6, 3.6), layout="constrained")
ax.plot(images_seen, rss_mib, "o-", label="streaming: process memory (RSS)")
ax.plot(images_seen, rss_mib[0] + feature_mib * (np.array(images_seen) - images_seen[0]),
        "--", label="+ the features of every image seen (one-shot fit)")
ax.set(xlabel="images seen", ylabel="MiB", title="partial_fit over a folder, 32 per batch")
ax.legend(fontsize=8)
plt.show()
print(f"RSS {rss_mib[0]:.0f} MiB after the first batch, {rss_mib[-1]:.0f} MiB after the last")

# %%
# Fitting on a Dask cluster
# -------------------------
#
# A lazy dask array of the same images, read in four blocks by the workers. A
# pipeline of a ``FeatureExtractor`` and a detector fits on it end to end: features are
# extracted block by block on the workers, each block's PaDiM moments are computed
# there and merged, and the images never reach the client. Here the cluster is two
# threads of this process; with a real one, ``Client("tcp://scheduler:8786")``.


@dask.delayed
def read_block(paths):
    return np.stack([read_image(path, 64) for path in paths])


blocks = [da.from_delayed(read_block(list(paths)), (len(paths), 3, 64, 64), np.float32)
          for paths in np.array_split(np.array(find_images(folder), dtype=object), 4)]
images = da.concatenate(blocks)
print(images)

with LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                  dashboard_address=None) as cluster, Client(cluster):
    on_dask = make_model().fit(images)

print(f"{on_dask[-1].n_samples_seen_} images, threshold from {on_dask[-1].calibration_!r}")

# %%
# The two models score new images alike (to float64 rounding):
test = load_textures("brick", n_train=1, n_test=8, image_size=64, random_state=1).X_test
a, b = streamed.score_samples(test), on_dask.score_samples(test)
print("streamed:", np.round(-a, 1))
print("dask:    ", np.round(-b, 1))
print(f"largest relative difference {np.max(np.abs(a - b) / np.abs(a)):.1e}")
workdir.cleanup()
