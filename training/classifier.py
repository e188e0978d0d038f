"""A small CNN classifier of the synthetic shapes; its penultimate features feed the Frechet distance."""
from __future__ import annotations

import json
from pathlib import Path

import torch.nn.functional as F
from safetensors.torch import load_file, safe_open, save_file
from torch import Tensor, nn

from reference.checkpoint import CheckpointError
from reference.files import atomic_path

FEATURE_DIM = 64
_META_KEY = "shapes_classifier"


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
    """The classifier saved at `path`, in eval mode."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"classifier {path} not found; train one with `python scripts/train_demo.py`")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if _META_KEY not in meta:
        raise CheckpointError(f"{path} is not a shapes classifier (no {_META_KEY!r} metadata)")
    model = ShapesClassifier(**json.loads(meta[_META_KEY]))
    model.load_state_dict(load_file(str(path)))
    return model.eval()
