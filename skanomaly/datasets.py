"""Real anomaly-detection data that ships with installed packages or inside skanomaly.

Every loader returns a :class:`sklearn.utils.Bunch` with a train-on-normals split:

* ``X_train``: normal samples only (the unsupervised one-class setting);
* ``X_test`` and ``y_test``: held-out normals and outliers in random order, ``y_test`` is
  ``int64`` with ``+1`` for inliers and ``-1`` for outliers (as ``predict`` returns);
* ``DESCR``: source, licence, citation and the split drawn.

Tabular loaders give ``float64`` arrays ``(n_samples, n_features)`` with the positions of
the rows in the source data (``index_train``, ``index_test``). Image loaders give
``float32`` arrays ``(n_images, 3, height, width)`` in [0, 1], grey values replicated to
three channels so that ImageNet backbones apply; where defects have pixel annotations,
``masks_test`` is a ``bool`` array ``(n_images, height, width)``, ``True`` on defects.

The split is a pure function of ``random_state`` (default 0): it is drawn from a local
``numpy.random.default_rng(random_state)``, never from global random state.
"""

from __future__ import annotations

import colorsys
import gzip
from importlib import resources
from math import ceil
from numbers import Integral, Real

import numpy as np
import skimage.data
from scipy import ndimage
from skimage import draw
from sklearn import datasets as sk_datasets
from sklearn.utils import Bunch, check_scalar

__all__ = [
    "load_shuttle",
    "load_breast_cancer_outliers",
    "load_digits_outliers",
    "load_faces",
    "load_textures",
]

TEXTURES = ("brick", "grass", "gravel")
DEFECT_TYPES = ("patch", "scratch", "blotch")


def _split_normals(is_outlier, test_size, contamination, rng):
    """Draw a train-on-normals split; return (index_train, index_test, y_test, summary).

    Indices point into the source arrays; the test set is held-out normals plus all
    outliers (``contamination=None``) or enough of them to make that outlier fraction.
    """
    check_scalar(test_size, "test_size", Real, min_val=0, max_val=1, include_boundaries="neither")
    normal, outlier = np.flatnonzero(~is_outlier), np.flatnonzero(is_outlier)
    n_test = ceil(test_size * normal.size)
    if n_test >= normal.size:
        raise ValueError(f"test_size={test_size} leaves no normal sample for training")
    if contamination is None:
        n_out = outlier.size
    else:
        check_scalar(
            contamination, "contamination", Real, min_val=0, max_val=1,
            include_boundaries="neither",
        )
        n_out = round(contamination * n_test / (1 - contamination))
        if not 1 <= n_out <= outlier.size:
            raise ValueError(
                f"contamination={contamination} with {n_test} test normals needs {n_out} "
                f"outliers; between 1 and {outlier.size} are available"
            )
    normal = rng.permutation(normal)
    test = np.r_[normal[:n_test], rng.choice(outlier, n_out, replace=False)]
    y_test = np.r_[np.ones(n_test, np.int64), -np.ones(n_out, np.int64)]
    order = rng.permutation(test.size)
    summary = (
        f"Split (train on normals): {normal.size - n_test} training normals; test set of "
        f"{n_test} normals and {n_out} outliers ({100 * n_out / test.size:.1f} % outliers)."
    )
    return normal[n_test:], test[order], y_test[order], summary


def _split_bunch(X, is_outlier, test_size, contamination, random_state, descr, **extra):
    """Bunch of a train-on-normals split of ``X`` (indexed on its first axis)."""
    rng = np.random.default_rng(random_state)
    train, test, y_test, summary = _split_normals(is_outlier, test_size, contamination, rng)
    return Bunch(
        X_train=X[train], X_test=X[test], y_test=y_test, index_train=train, index_test=test,
        DESCR=f"{descr}\n\n{summary}", **extra,
    )


_SPLIT_DOC = """test_size : float, default=0.5
        Fraction of the normal samples held out for the test set (rounded up), in (0, 1);
        the rest form ``X_train``.
    contamination : float or None, default={contamination}
        Fraction of outliers in the test set, in (0, 1): that many outliers are drawn
        without replacement. None puts every outlier in the test set.
    random_state : int, numpy.random.Generator or None, default=0
        Seed of the local generator that draws the split; the default makes the split
        fixed. None draws a fresh one."""

_TABULAR_RETURNS = """data : sklearn.utils.Bunch
        X_train : ndarray of float64, shape (n_train, n_features)
            Normal samples only.
        X_test : ndarray of float64, shape (n_test, n_features)
            Held-out normals and outliers, shuffled.
        y_test : ndarray of int64, shape (n_test,)
            +1 inlier, -1 outlier.
        index_train, index_test : ndarray of int64
            Row positions of the samples in the source data set.
        feature_names : ndarray of str, shape (n_features,)
            Names of the columns.
        DESCR : str
            Source, licence, citation and the split drawn."""

_SPLIT_RAISES = """ValueError
        If ``test_size`` or ``contamination`` is out of range, leaves no training
        normal, or asks for more outliers than exist.
    TypeError
        If ``test_size`` or ``contamination`` is not a real number."""


def _fill_doc(func):
    doc = func.__doc__
    # Python 3.13 strips the docstring's common indentation at compile time (earlier
    # versions keep it): the fragments, written for a 4-space docstring, follow suit
    dedented = "\n    Parameters\n" not in doc

    def fit(fragment: str) -> str:
        if not dedented:
            return fragment
        return "\n".join(line[4:] if line.startswith("    ") else line
                         for line in fragment.split("\n"))

    func.__doc__ = doc.format(
        split=fit(_SPLIT_DOC.format(contamination=func.__kwdefaults__["contamination"])),
        tabular_returns=fit(_TABULAR_RETURNS),
        split_raises=fit(_SPLIT_RAISES),
    )
    return func


_SHUTTLE_DESCR = """Statlog (Shuttle), ODDS version
-------------------------------
Nine integer attributes of NASA space-shuttle sensor readings. ODDS form: class 1
("Rad Flow") is normal, classes 2, 3, 5, 6 and 7 are outliers and class 4 is removed,
leaving 49,097 samples of which 3,511 (7.15 %) are outliers.

Source: ODDS (Rayana, 2016), UCI Statlog (Shuttle), file skanomaly/data/shuttle.csv.gz
as distributed in the river package (river/datasets/shuttle.csv.gz, river 0.26.1).
Licence: CC BY 4.0 (UCI Machine Learning Repository).
Citation: Statlog (Shuttle), UCI Machine Learning Repository, doi:10.24432/C5WS31;
S. Rayana, ODDS Library, Stony Brook University, 2016, https://odds.cs.stonybrook.edu."""


@_fill_doc
def load_shuttle(*, test_size=0.5, contamination=None, random_state=0):
    """Statlog Shuttle in its ODDS anomaly-detection form (49,097 x 9, 7.15 % outliers).

    Parameters
    ----------
    {split}

    Returns
    -------
    {tabular_returns}

    Raises
    ------
    {split_raises}

    Notes
    -----
    Class 1 of the UCI data is normal; classes 2, 3, 5, 6 and 7 (3,511 samples) are
    outliers; class 4 is dropped, as in ODDS. The file is vendored in ``skanomaly/data``
    (346 kB) from the river package; the features are the integer sensor readings,
    unscaled.

    References
    ----------
    .. [1] Statlog (Shuttle), UCI Machine Learning Repository, doi:10.24432/C5WS31.
       Licence CC BY 4.0.
    .. [2] S. Rayana, "ODDS Library", Stony Brook University, Department of Computer
       Sciences, 2016. https://odds.cs.stonybrook.edu

    Examples
    --------
    >>> from skanomaly.datasets import load_shuttle
    >>> data = load_shuttle()
    >>> data.X_train.shape, data.X_test.shape, int((data.y_test == -1).sum())
    ((22793, 9), (26304, 9), 3511)
    """
    source = resources.files(__package__).joinpath("data/shuttle.csv.gz")
    with source.open("rb") as raw, gzip.open(raw, "rt") as f:
        names = f.readline().strip().split(",")
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    X, is_outlier = table[:, :-1].astype(np.float64), table[:, -1] == 1
    return _split_bunch(
        X, is_outlier, test_size, contamination, random_state, _SHUTTLE_DESCR,
        feature_names=np.array(names[:-1]),
    )


_BREAST_CANCER_DESCR = """Breast Cancer Wisconsin (Diagnostic), malignant as outliers
-------------------------------------------------------------
30 real features of cell nuclei in 569 fine-needle aspirate images: 357 benign
(normal) and 212 malignant (outliers), from scikit-learn's load_breast_cancer.

Source: UCI Machine Learning Repository, bundled with scikit-learn.
Licence: CC BY 4.0.
Citation: W. N. Street, W. H. Wolberg, O. L. Mangasarian, "Nuclear feature extraction
for breast tumor diagnosis", Proc. SPIE 1905, 1993; doi:10.24432/C5DW2B."""


@_fill_doc
def load_breast_cancer_outliers(*, test_size=0.5, contamination=None, random_state=0):
    """Breast Cancer Wisconsin (Diagnostic): benign normal, malignant outliers.

    Parameters
    ----------
    {split}

    Returns
    -------
    {tabular_returns}

    Raises
    ------
    {split_raises}

    Notes
    -----
    With the defaults the test set is 179 benign and all 212 malignant samples, so
    outliers are the majority there; AUROC does not care, but the chance level of the
    anomaly-class average precision is 0.54. Pass e.g. ``contamination=0.1`` for a rare
    anomaly class.

    References
    ----------
    .. [1] W. N. Street, W. H. Wolberg, O. L. Mangasarian, "Nuclear feature extraction
       for breast tumor diagnosis", IS&T/SPIE Electronic Imaging, vol. 1905, 1993.
    .. [2] Breast Cancer Wisconsin (Diagnostic), UCI Machine Learning Repository,
       doi:10.24432/C5DW2B. Licence CC BY 4.0.

    Examples
    --------
    >>> from skanomaly.datasets import load_breast_cancer_outliers
    >>> data = load_breast_cancer_outliers()
    >>> data.X_train.shape, data.X_test.shape, int((data.y_test == -1).sum())
    ((178, 30), (391, 30), 212)
    """
    source = sk_datasets.load_breast_cancer()
    return _split_bunch(
        source.data, source.target == 0, test_size, contamination, random_state,
        _BREAST_CANCER_DESCR, feature_names=source.feature_names,
    )


_DIGITS_DESCR = """Optical Recognition of Handwritten Digits, one digit normal
-------------------------------------------------------------
1,797 8 x 8 images of handwritten digits (64 features, integer grey levels 0-16) from
scikit-learn's load_digits. One digit is the normal class, the nine others outliers.

Source: UCI Machine Learning Repository, bundled with scikit-learn.
Licence: CC BY 4.0.
Citation: E. Alpaydin, C. Kaynak, "Optical Recognition of Handwritten Digits", UCI
Machine Learning Repository, 1998; doi:10.24432/C50P49."""


@_fill_doc
def load_digits_outliers(normal_digit=0, *, test_size=0.5, contamination=0.5, random_state=0):
    """Handwritten digits: one digit normal, the nine others outliers.

    Parameters
    ----------
    normal_digit : int, default=0
        The digit, 0 to 9, that forms the normal class (174 to 183 samples).
    {split}

    Returns
    -------
    {tabular_returns}

    Raises
    ------
    ValueError
        If ``normal_digit`` is not in 0..9, or ``test_size`` or ``contamination`` is
        out of range, leaves no training normal, or asks for more outliers than exist.
    TypeError
        If ``normal_digit`` is not an integer, or ``test_size`` or ``contamination``
        not a real number.

    Notes
    -----
    The default ``contamination=0.5`` makes a balanced test set: the held-out normals
    plus as many outliers drawn uniformly from the other digits. The features are the
    raw grey levels 0-16 as float64.

    References
    ----------
    .. [1] E. Alpaydin, C. Kaynak, "Optical Recognition of Handwritten Digits", UCI
       Machine Learning Repository, 1998, doi:10.24432/C50P49. Licence CC BY 4.0.

    Examples
    --------
    >>> from skanomaly.datasets import load_digits_outliers
    >>> data = load_digits_outliers(normal_digit=3)
    >>> data.X_train.shape, data.X_test.shape, int((data.y_test == -1).sum())
    ((91, 64), (184, 64), 92)
    """
    check_scalar(normal_digit, "normal_digit", Integral, min_val=0, max_val=9)
    source = sk_datasets.load_digits()
    return _split_bunch(
        source.data, source.target != normal_digit, test_size, contamination, random_state,
        f"{_DIGITS_DESCR}\n\nNormal digit: {normal_digit}.",
        feature_names=np.array(source.feature_names),
    )


_FACES_DESCR = """LFW subset: faces normal, non-faces outliers
--------------------------------------------
200 grey 25 x 25 images from scikit-image's data.lfw_subset(): 100 faces randomly
drawn from Labeled Faces in the Wild (normal) and 100 non-face patches cut from the
backgrounds of the same photographs (outliers).

Source: scikit-image (skimage/data/lfw_subset.npy), from LFW.
Licence: distributed with scikit-image (BSD-3-Clause); the LFW photographs are news
images collected from the web and carry no separate licence.
Citation: G. B. Huang, M. Ramesh, T. Berg, E. Learned-Miller, "Labeled Faces in the
Wild", UMass Amherst technical report 07-49, 2007."""


@_fill_doc
def load_faces(*, test_size=0.5, contamination=0.5, random_state=0):
    """Load faces (normal) versus non-faces (outliers) from scikit-image's LFW subset.

    Parameters
    ----------
    {split}

    Returns
    -------
    data : sklearn.utils.Bunch
        X_train : ndarray of float32, shape (n_train, 3, 25, 25)
            Faces only, grey values in [0, 1] replicated to three channels.
        X_test : ndarray of float32, shape (n_test, 3, 25, 25)
            Held-out faces and non-faces, shuffled.
        y_test : ndarray of int64, shape (n_test,)
            +1 face, -1 non-face.
        index_train, index_test : ndarray of int64
            Positions in ``skimage.data.lfw_subset()`` (faces are 0-99).
        DESCR : str
            Source, licence, citation and the split drawn.

    Raises
    ------
    {split_raises}

    Notes
    -----
    Image-level labels only: a non-face is anomalous as a whole, so no pixel masks.

    References
    ----------
    .. [1] G. B. Huang, M. Ramesh, T. Berg, E. Learned-Miller, "Labeled Faces in the
       Wild: A Database for Studying Face Recognition in Unconstrained Environments",
       University of Massachusetts, Amherst, technical report 07-49, 2007.
    .. [2] G. B. Huang, M. Mattar, H. Lee, E. Learned-Miller, "Learning to align from
       scratch", NeurIPS 2012 (the subset shipped by scikit-image).

    Examples
    --------
    >>> from skanomaly.datasets import load_faces
    >>> data = load_faces()
    >>> data.X_train.shape, data.X_test.shape, data.X_test.dtype
    ((50, 3, 25, 25), (100, 3, 25, 25), dtype('float32'))
    """
    grey = skimage.data.lfw_subset().astype(np.float32)
    images = np.repeat(grey[:, None], 3, axis=1)
    is_outlier = np.arange(len(grey)) >= 100
    return _split_bunch(images, is_outlier, test_size, contamination, random_state, _FACES_DESCR)


_TEXTURES_DESCR = """Synthetic defects on real textures ({texture})
---------------------------------------------
Crops of a 512 x 512 grey texture from scikit-image (brick, grass, gravel), replicated
to RGB. Normal training crops come from the top half of the texture, test crops from
the bottom half (no overlap with training pixels); normal calibration crops, when asked
for, are drawn beside the test crops, from the same bottom half. Defective test images carry one
synthetic defect with an exact pixel mask: "patch" (a rectangle pasted from another
of the three textures), "scratch" (a dark or bright straight line) or "blotch" (an
ellipse blended with a saturated colour).

Source: scikit-image data (brick.png, grass.png, gravel.png).
Licence: CC0 (brick and gravel from CC0Textures, grass from DeviantArt user
linolafett), redistributed by scikit-image.
Citation: S. van der Walt et al., "scikit-image: image processing in Python", PeerJ
2:e453, 2014."""


def _check_textures_args(texture, n_train, n_test, image_size, defect_fraction,
                         n_calibration):
    if texture not in TEXTURES:
        raise ValueError(f"unknown texture {texture!r}; choose one of {TEXTURES}")
    check_scalar(n_train, "n_train", Integral, min_val=1)
    check_scalar(n_test, "n_test", Integral, min_val=1)
    check_scalar(n_calibration, "n_calibration", Integral, min_val=0)
    check_scalar(image_size, "image_size", Integral, min_val=16, max_val=256)
    check_scalar(defect_fraction, "defect_fraction", Real, min_val=0, max_val=1)


def _paste_patch(image, rng, donors):
    """Paste a rectangle cut from another texture; return the mask."""
    size = image.shape[0]
    height, width = rng.integers(max(2, size // 6), size // 3 + 1, size=2)
    top, left = rng.integers(0, size - height + 1), rng.integers(0, size - width + 1)
    donor = donors[rng.integers(len(donors))]
    d_top = rng.integers(0, donor.shape[0] - height + 1)
    d_left = rng.integers(0, donor.shape[1] - width + 1)
    image[top:top + height, left:left + width] = donor[
        d_top:d_top + height, d_left:d_left + width, None
    ]
    mask = np.zeros(image.shape[:2], bool)
    mask[top:top + height, left:left + width] = True
    return mask


def _draw_scratch(image, rng, donors):
    """Draw a straight dark or bright line, dilated ``size // 128`` times on large images."""
    size = image.shape[0]
    centre = rng.uniform(size / 4, 3 * size / 4, size=2)
    angle, half = rng.uniform(0, np.pi), rng.uniform(0.15, 0.35) * size
    offset = half * np.array([np.sin(angle), np.cos(angle)])
    ends = np.clip(np.rint([centre - offset, centre + offset]), 0, size - 1).astype(int)
    mask = np.zeros(image.shape[:2], bool)
    mask[draw.line(*ends[0], *ends[1])] = True
    if size >= 128:
        mask = ndimage.binary_dilation(mask, iterations=size // 128)
    image[mask] = rng.uniform(0.0, 0.15) if rng.random() < 0.5 else rng.uniform(0.85, 1.0)
    return mask


def _add_blotch(image, rng, donors):
    """Blend a saturated colour into a random ellipse."""
    size = image.shape[0]
    centre = rng.uniform(size / 8, 7 * size / 8, size=2)
    radii = rng.uniform(max(2.0, size / 12), size / 5, size=2)
    mask = np.zeros(image.shape[:2], bool)
    angle = rng.uniform(-np.pi, np.pi)
    mask[draw.ellipse(*centre, *radii, shape=mask.shape, rotation=angle)] = True
    colour = np.array(colorsys.hsv_to_rgb(rng.random(), 0.9, 0.9), np.float32)
    alpha = np.float32(rng.uniform(0.4, 0.7))
    image[mask] = (1 - alpha) * image[mask] + alpha * colour
    return mask


_DEFECT_MAKERS = dict(zip(DEFECT_TYPES, (_paste_patch, _draw_scratch, _add_blotch)))


def load_textures(
    texture="brick", *, n_train=100, n_test=60, image_size=64, defect_fraction=0.5,
    n_calibration=0, random_state=0,
):
    """Real textures with synthetic, pixel-annotated defects (MVTec-AD-like images).

    Parameters
    ----------
    texture : {"brick", "grass", "gravel"}, default="brick"
        The scikit-image texture (512 x 512 grey) that forms the normal class.
    n_train : int, default=100
        Number of normal training crops, >= 1.
    n_test : int, default=60
        Number of test crops, >= 1.
    image_size : int, default=64
        Side of the square crops in pixels, 16 to 256.
    defect_fraction : float, default=0.5
        Fraction of the test crops that receive a defect (rounded), in [0, 1]. The
        defect types are balanced (round-robin, then shuffled).
    n_calibration : int, default=0
        Number of normal calibration crops, >= 0, drawn from the bottom half as the
        test crops are: held-out normals exchangeable with the good test crops, for
        :meth:`~skanomaly.base.BaseDetector.calibrate`. They are drawn last, so the
        other arrays do not depend on ``n_calibration``.
    random_state : int, numpy.random.Generator or None, default=0
        Seed of the local generator drawing crop positions and defects.

    Returns
    -------
    data : sklearn.utils.Bunch
        X_train : ndarray of float32, shape (n_train, 3, image_size, image_size)
            Normal crops in [0, 1] (grey replicated to RGB), from the top half.
        X_test : ndarray of float32, shape (n_test, 3, image_size, image_size)
            Crops from the bottom half, some with a defect.
        y_test : ndarray of int64, shape (n_test,)
            +1 good, -1 defective.
        X_calibration : ndarray of float32, shape (n_calibration, 3, image_size, image_size)
            Normal crops from the bottom half, without defects.
        masks_test : ndarray of bool, shape (n_test, image_size, image_size)
            True on the changed pixels; all False for good images. Outside the mask,
            a test image equals its clean crop exactly.
        defect_type_test : ndarray of str, shape (n_test,)
            "good", "patch", "scratch" or "blotch".
        origin_train, origin_test, origin_calibration : ndarray of int64, shape (n, 2)
            (row, column) of each crop's top-left corner in the texture.
        texture : str
            The ``texture`` argument.
        DESCR : str
            Source, licence, citation and the sizes drawn.

    Raises
    ------
    ValueError
        If ``texture`` is unknown or a size or fraction is out of range.
    TypeError
        If a size is not an integer or ``defect_fraction`` not a real number.

    Notes
    -----
    Training crops lie entirely in rows 0-255 of the texture and test crops in rows
    256-511, so no test pixel was seen in training. The two halves differ somewhat (a
    covariate shift): a threshold set on scores of training crops, even out-of-sample
    ones, flags more than ``contamination`` of the good test crops; one set by
    ``calibrate`` on the calibration crops, drawn from the bottom half like the test
    crops, flags about ``contamination`` of them. "patch" defects paste a rectangle
    (1/6 to 1/3 of the side) from one of the two other textures; "scratch" defects are
    a Bresenham line (``skimage.draw.line``) of length 0.3 to 0.7 of the side (before
    clipping to the image), dilated ``image_size // 128`` times (a 4-connected dilation)
    from 128 pixels on, set to a dark (0-0.15) or bright (0.85-1) grey; "blotch"
    defects blend a colour of saturation and value 0.9 with opacity 0.4-0.7 into an
    ellipse (``skimage.draw.ellipse``). Masks are binary and exact: they mark precisely
    the pixels that were changed.

    References
    ----------
    .. [1] S. van der Walt et al., "scikit-image: image processing in Python", PeerJ
       2:e453, 2014 (textures under CC0).
    .. [2] P. Bergmann, M. Fauser, D. Sattlegger, C. Steger, "MVTec AD - A Comprehensive
       Real-World Dataset for Unsupervised Anomaly Detection", CVPR 2019 (the protocol
       imitated here).

    Examples
    --------
    >>> import numpy as np
    >>> from skanomaly.datasets import load_textures
    >>> data = load_textures("grass", n_train=20, n_test=12, image_size=32)
    >>> data.X_train.shape, data.X_test.shape, data.masks_test.shape
    ((20, 3, 32, 32), (12, 3, 32, 32), (12, 32, 32))
    >>> print(np.unique(data.defect_type_test))
    ['blotch' 'good' 'patch' 'scratch']
    """
    _check_textures_args(texture, n_train, n_test, image_size, defect_fraction,
                         n_calibration)
    rng = np.random.default_rng(random_state)
    grey = {name: getattr(skimage.data, name)().astype(np.float32) / 255 for name in TEXTURES}
    source = grey[texture]
    donors = [grey[name] for name in TEXTURES if name != texture]
    half, width = source.shape[0] // 2, source.shape[1]

    def crop_origins(n, first_row):
        rows = rng.integers(first_row, first_row + half - image_size + 1, size=n)
        return np.stack([rows, rng.integers(0, width - image_size + 1, size=n)], axis=1)

    def crops(origins):
        out = np.empty((len(origins), image_size, image_size, 3), np.float32)
        for image, (row, col) in zip(out, origins):
            image[...] = source[row:row + image_size, col:col + image_size, None]
        return out

    origin_train, origin_test = crop_origins(n_train, 0), crop_origins(n_test, half)
    X_train, X_test = crops(origin_train), crops(origin_test)
    n_defective = round(defect_fraction * n_test)
    defect_type = np.full(n_test, "good", dtype="<U7")
    defective = rng.choice(n_test, n_defective, replace=False)
    defect_type[defective] = rng.permutation(np.resize(DEFECT_TYPES, n_defective))
    masks = np.zeros((n_test, image_size, image_size), bool)
    for i in defective:
        masks[i] = _DEFECT_MAKERS[defect_type[i]](X_test[i], rng, donors)
    origin_calibration = crop_origins(n_calibration, half)  # last: the rest stays as is
    X_calibration = crops(origin_calibration)
    return Bunch(
        X_train=np.ascontiguousarray(X_train.transpose(0, 3, 1, 2)),
        X_test=np.ascontiguousarray(X_test.transpose(0, 3, 1, 2)),
        y_test=np.where(defect_type == "good", 1, -1).astype(np.int64),
        X_calibration=np.ascontiguousarray(X_calibration.transpose(0, 3, 1, 2)),
        masks_test=masks,
        defect_type_test=defect_type,
        origin_train=origin_train,
        origin_test=origin_test,
        origin_calibration=origin_calibration,
        texture=texture,
        DESCR=_TEXTURES_DESCR.format(texture=texture)
        + f"\n\n{n_train} training crops, {n_test} test crops of {image_size} x {image_size} "
        f"pixels, {n_defective} defective; {n_calibration} normal calibration crops.",
    )
