"""Sample quality of a backend on the demo shapes: the classifier's accuracy and a Frechet distance on its features."""
from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from d2c_export.manifest import EngineError, Manifest, write_json_atomic
from d2c_export.runtime import generate_images, open_backend, save_images
from d2c_export.sources import DEMO_CHECKPOINT
from reference.classifier import ShapesClassifier, load_classifier
from reference.data import NUM_CLASSES, make_dataset
from reference.pipeline import SamplingParams

log = logging.getLogger(__name__)

DEFAULT_CLASSIFIER = DEMO_CHECKPOINT.parent / "shapes-classifier.safetensors"  # trained with the demo
HELD_OUT_SEED = 20_000  # the real images of the Frechet distance; training uses small seeds
# A backend passes when its accuracy (percentage points) and Frechet distance are this close to the reference's.
MAX_ACCURACY_DROP = 3.0
MAX_FD_RISE = 3.0
# No guidance, and at least 500 denoising steps: the demo's small diffusion head is not precise enough near
# t = 999, where the cosine schedule's sqrt(1 / alpha_bar) reaches 2e4, for coarser respacings (they blow up).
DEMO_SAMPLING = SamplingParams(cfg=1.0, num_iter=16, diffusion_steps=500)
GRID_ZOOM = 8  # 16 px samples are drawn 8x larger in --grid
BACKEND_CHOICES = ("torch", "ort", "ort-fp16", "trt", "trt-fp16")


def sqrtm_psd_trace(a: np.ndarray, b: np.ndarray) -> float:
    """tr sqrt(A B) for symmetric PSD A, B, as tr sqrt(sqrt(A) B sqrt(A)) by eigen-decompositions."""
    w, v = np.linalg.eigh(a)
    root_a = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    m = root_a @ b @ root_a
    eig = np.linalg.eigvalsh((m + m.T) / 2.0)
    return float(np.sqrt(np.clip(eig, 0.0, None)).sum())


def frechet_distance(x: np.ndarray, y: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to feature rows x (N, D) and y (M, D) (float64)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1] or min(len(x), len(y)) < 2:
        raise ValueError(f"need two (N>=2, D) feature sets of the same D, got {x.shape} and {y.shape}")
    mu_x, mu_y = x.mean(0), y.mean(0)
    cov_x, cov_y = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    diff = mu_x - mu_y
    return float(diff @ diff + np.trace(cov_x) + np.trace(cov_y) - 2.0 * sqrtm_psd_trace(cov_x, cov_y))


@torch.no_grad()
def classify(classifier: ShapesClassifier, images: Tensor) -> tuple[Tensor, Tensor]:
    """Images (B, 3, H, W) in [-1, 1] -> (predicted labels (B,), penultimate features (B, D))."""
    features = classifier.features(images.float())
    return classifier.head(features).argmax(dim=1), features


def real_features(classifier: ShapesClassifier, per_class: int, seed: int = HELD_OUT_SEED) -> np.ndarray:
    """Classifier features of `per_class` held-out real images of every class."""
    images, _ = make_dataset(per_class * NUM_CLASSES, seed)
    return classify(classifier, images)[1].numpy()


@dataclass
class QualityReport:
    backend: str
    description: str
    images: int
    accuracy: float  # percent of samples the classifier labels as their class
    frechet: float  # on the classifier's penultimate features, against held-out real images


def quality_labels(per_class: int) -> list[int]:
    """`per_class` images of every class, classes interleaved (so any prefix covers the classes evenly)."""
    return [c for _ in range(per_class) for c in range(NUM_CLASSES)]


def sample_quality(stages, labels: list[int], params: SamplingParams, seed: int, batch: int,
                   classifier: ShapesClassifier, reference: np.ndarray, progress: bool = False
                   ) -> tuple[float, float, Tensor]:
    """Generate `labels` in batches (batch i seeded seed + i); returns (accuracy %, Frechet distance, images)."""
    chunks = []
    for i in range(0, len(labels), batch):
        result, _ = generate_images(stages, labels[i:i + batch], params, seed + i // batch, batch, progress)
        chunks.append(result.images)
    images = torch.cat(chunks)
    predicted, features = classify(classifier, images)
    accuracy = 100.0 * float((predicted == torch.tensor(labels)).float().mean())
    return accuracy, frechet_distance(features.numpy(), reference), images


def _backend_precision(name: str) -> tuple[str, str]:
    backend, _, precision = name.partition("-")
    return backend, precision or "fp32"


def evaluate_backends(engines: str | Path, backends: list[str], per_class: int, params: SamplingParams, seed: int,
                      classifier: ShapesClassifier, real_per_class: int, threads: int = 0,
                      progress: bool = False) -> tuple[list[QualityReport], Tensor]:
    """Quality of every backend on the same labels and seeds; returns the reports and the first one's images."""
    manifest = Manifest.load(engines)
    if manifest.d2c_config.num_classes != classifier.num_classes:
        raise ValueError(f"the model has {manifest.d2c_config.num_classes} classes, the classifier "
                         f"{classifier.num_classes}: use the checkpoint the classifier was trained with")
    for name in backends:
        if name not in BACKEND_CHOICES:
            raise ValueError(f"unknown backend {name!r}; choose from {', '.join(BACKEND_CHOICES)}")
        backend, precision = _backend_precision(name)
        kind = f"onnx-{precision}" if backend == "ort" else f"trt-{precision}"
        if backend != "torch" and not all(kind in kinds for kinds in manifest.stages.values()):
            fp16 = " --fp16" if precision == "fp16" else ""
            raise EngineError(f"{engines} has no {kind} build of every stage, so {name!r} cannot be measured; "
                              f"build it with `d2c-export {'onnx --stage all' if backend == 'ort' else 'trt'}"
                              f"{fp16} ...` or leave {name!r} out of --backends")
    reference = real_features(classifier, real_per_class)
    labels = quality_labels(per_class)
    reports, first = [], None
    for name in backends:
        backend, precision = _backend_precision(name)
        stages, description = open_backend(engines, backend, precision, threads)
        acc, fd, images = sample_quality(stages, labels, params, seed, manifest.max_batch, classifier, reference,
                                         progress)
        reports.append(QualityReport(name, description, len(labels), acc, fd))
        log.info("%s: accuracy %.1f%%, Frechet %.3f (%s)", name, acc, fd, description)
        first = images if first is None else first
    return reports, first


def gate_failures(reports: list[QualityReport], max_drop: float = MAX_ACCURACY_DROP,
                  max_rise: float = MAX_FD_RISE) -> list[str]:
    """One line per backend whose figures are worse than the first report's (the reference) by more than allowed."""
    ref = reports[0]
    out = []
    for r in reports[1:]:
        if ref.accuracy - r.accuracy > max_drop:
            out.append(f"{r.backend}: accuracy {r.accuracy:.1f}% is {ref.accuracy - r.accuracy:.1f} points below "
                       f"{ref.backend}'s {ref.accuracy:.1f}% (allowed {max_drop})")
        if r.frechet - ref.frechet > max_rise:
            out.append(f"{r.backend}: Frechet {r.frechet:.2f} is {r.frechet - ref.frechet:.2f} above "
                       f"{ref.backend}'s {ref.frechet:.2f} (allowed {max_rise})")
    return out


def save_grid(images: Tensor, path: str | Path, zoom: int = GRID_ZOOM) -> Path:
    """Write images (B, 3, H, W) as one PNG grid, each pixel drawn as a zoom x zoom block."""
    return save_images(torch.nn.functional.interpolate(images, scale_factor=zoom, mode="nearest"), path)


def markdown(reports: list[QualityReport]) -> str:
    lines = ["| backend | images | accuracy % | Frechet | runtime |", "|---|---:|---:|---:|---|"]
    lines += [f"| {r.backend} | {r.images} | {r.accuracy:.1f} | {r.frechet:.3f} | {r.description} |" for r in reports]
    return "\n".join(lines)


def quality_parser() -> argparse.ArgumentParser:
    d = DEMO_SAMPLING
    p = argparse.ArgumentParser(prog="d2c-quality", description="Sample quality of backends on the demo shapes: "
                                "class accuracy and Frechet distance under the shapes classifier.")
    p.add_argument("--engines", default="engines")
    p.add_argument("--backends", default="torch,ort", type=lambda t: [b.strip() for b in t.split(",") if b.strip()],
                   help=f"comma-separated, the first is the reference of the gate; from {', '.join(BACKEND_CHOICES)}")
    p.add_argument("--classifier", default=str(DEFAULT_CLASSIFIER), help="default: the demo's, under checkpoints/")
    p.add_argument("--per-class", type=int, default=20, help="samples per class and backend")
    p.add_argument("--real-per-class", type=int, default=200, help="held-out real images per class for the FD")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cfg", type=float, default=d.cfg)
    p.add_argument("--num-iter", type=int, default=d.num_iter)
    p.add_argument("--diffusion-steps", type=int, default=d.diffusion_steps)
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: its default)")
    p.add_argument("--grid", help="also write the first backend's first 16 samples as a 4x4 PNG grid here (8x zoom)")
    p.add_argument("--json", help="also write the reports as JSON here")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    return p


def _cmd_quality(args: argparse.Namespace) -> int:
    if args.per_class < 1 or args.real_per_class < 2:
        raise ValueError("--per-class must be >= 1 and --real-per-class >= 2")
    if not args.backends:
        raise ValueError("--backends is empty; name at least one, e.g. torch,ort")
    params = SamplingParams(cfg=args.cfg, num_iter=args.num_iter, diffusion_steps=args.diffusion_steps)
    classifier = load_classifier(args.classifier)
    reports, images = evaluate_backends(args.engines, args.backends, args.per_class, params, args.seed, classifier,
                                        args.real_per_class, args.threads, progress=not args.quiet)
    print(markdown(reports))
    if args.grid:
        log.info("wrote %s", save_grid(images[:16], args.grid))
    failures = gate_failures(reports)
    if args.json:
        write_json_atomic(Path(args.json), {"params": {"cfg": params.cfg, "num_iter": params.num_iter,
                                                       "diffusion_steps": params.diffusion_steps, "seed": args.seed},
                                            "reports": [asdict(r) for r in reports], "failures": failures})
    for line in failures:
        print(f"FAIL {line}")
    return 1 if failures else 0


def quality_main(argv: list[str] | None = None) -> int:
    from d2c_export.cli import _guard
    args = quality_parser().parse_args(argv)
    return _guard(_cmd_quality, args)
