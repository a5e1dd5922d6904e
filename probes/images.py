"""Image sources for vision models, prepared with numpy and torch only.

An *image source* is a short string:

- ``sklearn:digits`` (default): the 1,797 8x8 handwritten digits bundled with scikit-learn
  (no download), grey levels 0..16;
- ``sklearn:sample``: scikit-learn's two bundled photographs (``china.jpg``,
  ``flower.jpg``); reading JPEG needs Pillow (``pip install pillow``);
- a folder of images, or one image file: ``.npy`` arrays (``H x W`` or ``H x W x C``; uint8
  0..255 or floats in 0..1) always; ``.png``/``.jpg``/``.jpeg``/``.bmp``/``.gif``/``.webp``
  where Pillow is installed.

Every image becomes RGB in 0..1 (grey repeated on three channels, alpha dropped), is resized
to the model's square input with bilinear interpolation (as the ViT image processor does,
aspect ratio not kept), and normalised ``(x - mean) / std`` with the model's processor values
(ViT's default 0.5 / 0.5, i.e. pixels in -1..1).

Example:
    >>> images = load_images("sklearn:digits", max_images=2)
    >>> [(im.name, im.pixels.shape) for im in images]
    [('digits#0 (label 0)', (8, 8, 3)), ('digits#1 (label 1)', (8, 8, 3))]
    >>> tuple(to_pixel_values(images, 32).shape)
    (2, 3, 32, 32)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from probes.errors import ImageSourceError, MissingPackageError

PILLOW_PIP = "pip install pillow"
PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
DEFAULT_IMAGES = "sklearn:digits"


@dataclass(frozen=True)
class Image:
    """One image.

    Attributes:
        name: Where it came from (``digits#17 (label 7)``, a file name).
        pixels: ``[H, W, 3]`` float32 RGB in 0..1.
    """

    name: str
    pixels: np.ndarray


def _as_rgb(array: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(array)
    if array.dtype == np.uint8:
        array = array.astype(np.float32) / 255.0
    array = array.astype(np.float32)
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise ImageSourceError(f"{name}: expected an H x W or H x W x 1/3/4 image, "
                               f"got shape {array.shape}")
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    array = array[:, :, :3]
    if array.size and (array.min() < -1e-6 or array.max() > 1 + 1e-6):
        raise ImageSourceError(f"{name}: float pixels must lie in 0..1 (uint8 in 0..255)")
    return np.clip(array, 0.0, 1.0)


def _read_pil(path: Path) -> np.ndarray:
    try:
        from PIL import Image as PILImage
    except ImportError as err:
        raise MissingPackageError(
            f"reading {path.suffix} images needs Pillow, which is not installed; install it "
            f"with: {PILLOW_PIP} (or give .npy arrays)") from err
    try:
        with PILImage.open(path) as handle:
            return np.asarray(handle.convert("RGB"))
    except OSError as err:
        raise ImageSourceError(f"cannot read the image {path}: {err}") from err


def _read_file(path: Path) -> Image:
    if path.suffix.lower() == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise ImageSourceError(f"cannot read the array {path}: {err}") from err
    elif path.suffix.lower() in PIL_SUFFIXES:
        array = _read_pil(path)
    else:
        raise ImageSourceError(f"{path} is not an image this tool reads (.npy or "
                               f"{', '.join(PIL_SUFFIXES)})")
    return Image(path.name, _as_rgb(array, path.name))


def _digits(limit: int | None) -> list[Image]:
    from sklearn.datasets import load_digits

    data = load_digits()
    n = len(data.images) if limit is None else min(limit, len(data.images))
    return [Image(f"digits#{i} (label {int(data.target[i])})",
                  _as_rgb(data.images[i] / 16.0, f"digits#{i}")) for i in range(n)]


def _samples() -> list[Image]:
    try:
        from sklearn.datasets import load_sample_images

        data = load_sample_images()
    except ImportError as err:
        raise MissingPackageError(
            "scikit-learn's sample photographs are JPEG files and need Pillow to read; install "
            f"it with: {PILLOW_PIP} (or use sklearn:digits)") from err
    return [Image(Path(f).name, _as_rgb(im, Path(f).name))
            for f, im in zip(data.filenames, data.images)]


def check_image_source(source: str) -> None:
    """Refuse an image source that is unknown or missing, without reading any image.

    Args:
        source: ``sklearn:digits``, ``sklearn:sample``, a folder of images or an image file.

    Raises:
        ImageSourceError: An unknown ``sklearn:`` source, or a path that does not exist.
    """
    if source in ("sklearn:digits", "sklearn:sample"):
        return
    path = Path(source).expanduser()
    if source.startswith("sklearn:"):
        raise ImageSourceError(f"unknown image source {source!r}; use sklearn:digits, "
                               "sklearn:sample, a folder of images or an image file")
    if not path.exists():
        raise ImageSourceError(f"the image source {source!r} does not exist (use "
                               "sklearn:digits, sklearn:sample, a folder or an image file)")


def load_images(source: str = DEFAULT_IMAGES, max_images: int | None = None) -> list[Image]:
    """The images of a source, in order, at most ``max_images``.

    Args:
        source: ``sklearn:digits`` (default), ``sklearn:sample``, a folder of images or one
            image file (see the module docstring).
        max_images: Cap on the number of images (None: all of them).

    Returns:
        The :class:`Image` objects, RGB float32 in 0..1 at their own size.

    Raises:
        ImageSourceError: Unknown, missing, empty or unreadable source.
        MissingPackageError: Pillow is needed for the files and is not installed.
    """
    check_image_source(source)
    if source == "sklearn:digits":
        images = _digits(max_images)
    elif source == "sklearn:sample":
        images = _samples()
    else:
        path = Path(source).expanduser()
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file()
                           and p.suffix.lower() in (".npy", *PIL_SUFFIXES))
            if not files:
                raise ImageSourceError(f"the folder {path} holds no .npy or image files")
        else:
            files = [path]
        images = [_read_file(f) for f in files[: max_images or None]]
    images = images[: max_images or None]
    if not images:
        raise ImageSourceError(f"the image source {source!r} gives no images")
    return images


def to_pixel_values(
    images: Sequence[Image], size: int, mean: Sequence[float] = (0.5, 0.5, 0.5),
    std: Sequence[float] = (0.5, 0.5, 0.5),
) -> Float[Tensor, "batch 3 size size"]:
    """Resize (bilinear) and normalise images into a model's ``pixel_values``.

    Args:
        images: The images.
        size: Side of the model's square input, in pixels.
        mean: Per-channel mean subtracted after resizing (the processor's ``image_mean``).
        std: Per-channel divisor (the processor's ``image_std``).

    Returns:
        ``[batch, 3, size, size]`` float32 pixel values.
    """
    out = []
    for image in images:
        x = torch.from_numpy(np.ascontiguousarray(image.pixels)).permute(2, 0, 1)[None]
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear",
                                            align_corners=False, antialias=True)
        out.append(x[0])
    pixels = torch.stack(out).clamp(0.0, 1.0)
    m = torch.tensor(list(mean), dtype=pixels.dtype).view(1, 3, 1, 1)
    s = torch.tensor(list(std), dtype=pixels.dtype).view(1, 3, 1, 1)
    return (pixels - m) / s
