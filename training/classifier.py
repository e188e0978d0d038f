"""A small CNN classifier of the synthetic shapes; its penultimate features feed the Frechet distance."""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from reference.checkpoint import CheckpointError, load_state_strict, read_metadata, state_mismatch, tensor_shapes
from reference.files import atomic_path, not_a_readable_file
from reference.json_files import Int, JsonError, Obj, parse_json

FEATURE_DIM = 64
_META_KEY = "shapes_classifier"
SIZES_SCHEMA = Obj({"num_classes": Int(1, 1 << 16)}, {"width": Int(1, 4096), "feature_dim": Int(1, 4096)})


class ShapesClassifier(nn.Module):
    """Three conv layers, global average pooling to `FEATURE_DIM` features, then a linear layer."""

    def __init__(self, num_classes: int, width: int = 32, feature_dim: int = FEATURE_DIM):
        super().__init__()
        self.num_classes, self.width, self.feature_dim = num_classes, width, feature_dim
        self.body = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.GELU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(2 * width, feature_dim, 3, stride=2, padding=1), nn.GELU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, images: Tensor) -> Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> penultimate features (B, feature_dim)."""
        return self.body(images).mean(dim=(2, 3))

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.features(images))  # (B, num_classes) logits


def classifier_loss(model: ShapesClassifier, images: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy of the classifier's logits."""
    return F.cross_entropy(model(images), labels)


def save_classifier(model: ShapesClassifier, path: str | Path) -> Path:
    """Write the classifier's weights with its sizes as metadata (safetensors)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {_META_KEY: json.dumps({"num_classes": model.num_classes, "width": model.width,
                                    "feature_dim": model.feature_dim})}
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp), metadata=meta)
    return path


def load_classifier(path: str | Path) -> ShapesClassifier:
    """The classifier saved at `path`, in eval mode: its header and sizes checked before anything is allocated."""
    path = Path(path)
    problem = not_a_readable_file(path)
    if problem:
        raise CheckpointError(f"classifier {path} {problem}; name a classifier file with --classifier, or train the "
                              "demo's with `python scripts/train_demo.py`")
    meta = read_metadata(path)  # the header validated: every tensor's bytes inside the file
    if _META_KEY not in meta:
        raise CheckpointError(f"{path} is not a shapes classifier (no {_META_KEY!r} metadata)")
    try:
        sizes = parse_json(meta[_META_KEY], SIZES_SCHEMA)
    except JsonError as exc:
        raise CheckpointError(f"{path}: invalid {_META_KEY} metadata: {exc}") from None
    with torch.device("meta"):  # the sizes' shapes, compared with the file's before any memory is taken
        expected = {k: tuple(v.shape) for k, v in ShapesClassifier(**sizes).state_dict().items()}
    problem = state_mismatch(expected, tensor_shapes(path), "ShapesClassifier", str(path))
    if problem:
        raise CheckpointError(problem)
    model = ShapesClassifier(**sizes)
    load_state_strict(model, load_file(str(path)), str(path))
    return model.eval()
