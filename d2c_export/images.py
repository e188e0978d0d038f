"""Images as files: (B, 3, H, W) tensors in [-1, 1] to PNG grids, written atomically; one PNG encoder for all."""
from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from reference.files import OutputPathError, write_bytes_atomic

GRID_ZOOM = 8  # the demo's 16 px samples are drawn 8x larger in quality grids
PNG_SUFFIX = ".png"  # the one image format the commands write
MAX_IMAGE_SIDE = 4096  # a PNG read back (d2c-quality --samples) is refused above this many pixels a side, undecoded


def check_png_name(path: str | Path, flag: str | None = None) -> None:
    """Refuse an image output whose name says another format than the PNG that is written."""
    if Path(path).suffix.lower() != PNG_SUFFIX:
        raise OutputPathError(f"{flag + ': ' if flag else ''}{path} does not end in {PNG_SUFFIX}, and images are "
                              f"written as PNG; name a {PNG_SUFFIX} file")


def to_uint8(images: Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def grid(images: Tensor, zoom: int = 1) -> np.ndarray:
    """The images as one near-square (rows * H, cols * W, 3) uint8 grid, each pixel a zoom x zoom block."""
    if zoom > 1:
        images = torch.nn.functional.interpolate(images, scale_factor=zoom, mode="nearest")
    x = to_uint8(images)
    b, h, w, _ = x.shape
    cols = int(np.ceil(np.sqrt(b)))
    rows = int(np.ceil(b / cols))
    out = np.zeros((rows * h, cols * w, 3), dtype=np.uint8)
    for i in range(b):
        r, c = divmod(i, cols)
        out[r * h:(r + 1) * h, c * w:(c + 1) * w] = x[i]
    return out


def png_bytes(pixels: np.ndarray) -> bytes:
    """One (H, W, 3) uint8 image as PNG bytes: every PNG of the project is encoded here, so equal pixels give equal
    bytes."""
    from PIL import Image
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def read_png(path: str | Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """A PNG file as (H, W, 3) uint8; ValueError, before decoding, for another format, a side above
    `MAX_IMAGE_SIDE`, or a (width, height) other than `size` when given."""
    from PIL import Image, UnidentifiedImageError
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(path, formats=["PNG"]) as image:
                width, height = image.size
                if max(width, height) > MAX_IMAGE_SIDE or (size is not None and (width, height) != tuple(size)):
                    want = f"{size[0]} x {size[1]}" if size is not None else f"at most {MAX_IMAGE_SIDE} a side"
                    raise ValueError(f"{path} is {width} x {height} pixels, not {want}")
                return np.asarray(image.convert("RGB"), dtype=np.uint8)
        except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning, OSError,
                SyntaxError) as exc:
            raise ValueError(f"{path} is not a readable PNG ({exc})") from None


def save_images(images: Tensor, path: str | Path, zoom: int = 1) -> Path:
    """Write (B, 3, H, W) images in [-1, 1] as one PNG (a grid when B > 1), atomically."""
    check_png_name(path)
    return write_bytes_atomic(path, png_bytes(grid(images, zoom)))
