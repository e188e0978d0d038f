"""A deterministic synthetic class-conditional dataset: coloured shapes on plain backgrounds, drawn in code."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

SUPERSAMPLE = 4  # each pixel is the mean of SUPERSAMPLE**2 sub-pixel samples (anti-aliasing)
SHAPES = ("circle", "square", "triangle", "cross", "ring")
COLOURS = {  # RGB in [0, 1]
    "red": (0.95, 0.15, 0.1), "green": (0.15, 0.85, 0.2), "blue": (0.2, 0.35, 1.0), "yellow": (1.0, 0.9, 0.1),
    "magenta": (0.95, 0.2, 0.9), "cyan": (0.1, 0.9, 0.95),
}
# Each shape appears in two colours and most colours on two shapes, so a class needs both to be told apart.
CLASSES: tuple[tuple[str, str], ...] = (
    ("circle", "red"), ("circle", "blue"), ("square", "green"), ("square", "yellow"), ("triangle", "blue"),
    ("triangle", "magenta"), ("cross", "red"), ("cross", "cyan"), ("ring", "yellow"), ("ring", "green"),
)
NUM_CLASSES = len(CLASSES)
CLASS_NAMES = tuple(f"{colour} {shape}" for shape, colour in CLASSES)  # "red circle": the demo export records these


@dataclass(frozen=True)
class ShapesSpec:
    """Image size and the ranges of the random nuisance factors (sizes as fractions of the image side)."""

    size: int = 16
    min_scale: float = 0.55
    max_scale: float = 0.75
    max_offset: float = 0.12  # centre offset from the middle, as a fraction of the side
    background: tuple[float, float] = (0.0, 0.35)  # grey level range of the background, in [0, 1]
    tint: float = 0.08  # per-channel random tint added to the background


def _coverage(shape: str, u: Tensor, v: Tensor) -> Tensor:
    """Inside-test of `shape` in its own frame: u, v (B, P) in units of the half-size -> (B, P) in {0, 1}."""
    if shape == "circle":
        inside = u * u + v * v <= 1.0
    elif shape == "square":
        inside = (u.abs() <= 0.8) & (v.abs() <= 0.8)
    elif shape == "triangle":  # equilateral, centred on its centroid, pointing up in its frame
        inside = (v >= -0.5) & (math.sqrt(3.0) * u - v <= 1.0) & (-math.sqrt(3.0) * u - v <= 1.0)
    elif shape == "cross":
        inside = ((u.abs() <= 1.0) & (v.abs() <= 0.33)) | ((u.abs() <= 0.33) & (v.abs() <= 1.0))
    elif shape == "ring":
        r2 = u * u + v * v
        inside = (r2 <= 1.0) & (r2 >= 0.5 ** 2)
    else:
        raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")
    return inside.float()


def render(labels: Tensor, generator: torch.Generator, spec: ShapesSpec = ShapesSpec()) -> Tensor:
    """Images (B, 3, size, size) in [-1, 1] of classes `labels` (B,), every nuisance drawn from `generator`.

    Draws, in order: (B, 4) uniforms (scale, angle, x offset, y offset), (B,) background grey, (B, 3) tint.
    """
    labels = torch.as_tensor(labels, dtype=torch.int64).view(-1)
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= NUM_CLASSES):
        raise ValueError(f"labels must be in [0, {NUM_CLASSES - 1}], got {labels.tolist()}")
    bsz, side = labels.shape[0], spec.size * SUPERSAMPLE
    u4 = torch.rand(bsz, 4, generator=generator)
    grey = torch.rand(bsz, generator=generator)
    tint = torch.rand(bsz, 3, generator=generator)
    scale = spec.min_scale + (spec.max_scale - spec.min_scale) * u4[:, 0]  # diameter / side
    angle = 2.0 * math.pi * u4[:, 1]
    centre = (u4[:, 2:] * 2.0 - 1.0) * spec.max_offset  # (B, 2) in side units from the middle
    coords = (torch.arange(side, dtype=torch.float32) + 0.5) / side - 0.5  # sub-pixel centres in [-0.5, 0.5]
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    dx = x.reshape(1, -1) - centre[:, :1]  # (B, P)
    dy = y.reshape(1, -1) - centre[:, 1:]
    half = (scale / 2.0)[:, None]
    cos, sin = torch.cos(angle)[:, None], torch.sin(angle)[:, None]
    u = (cos * dx + sin * dy) / half
    v = (-sin * dx + cos * dy) / half
    v = -v  # image rows grow downwards; the shape frame's v grows upwards
    mask = torch.zeros(bsz, side * side)
    colour = torch.zeros(bsz, 3)
    for index, (shape, colour_name) in enumerate(CLASSES):
        rows = labels == index
        if rows.any():
            mask[rows] = _coverage(shape, u[rows], v[rows])
            colour[rows] = torch.tensor(COLOURS[colour_name])
    lo, hi = spec.background
    background = (lo + (hi - lo) * grey)[:, None] + spec.tint * (tint * 2.0 - 1.0)  # (B, 3)
    mask = F.avg_pool2d(mask.view(bsz, 1, side, side), SUPERSAMPLE)  # (B, 1, size, size) coverage
    image = background[:, :, None, None] * (1.0 - mask) + colour[:, :, None, None] * mask
    return (image.clamp(0.0, 1.0) * 2.0 - 1.0).contiguous()


def make_dataset(count: int, seed: int, spec: ShapesSpec = ShapesSpec()) -> tuple[Tensor, Tensor]:
    """`count` images with balanced labels in a seeded random order: (images (N, 3, H, W), labels (N,))."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(count) % NUM_CLASSES
    labels = labels[torch.randperm(count, generator=generator)]
    return render(labels, generator, spec), labels
