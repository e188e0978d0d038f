"""Sample quality of a backend on the demo shapes: the classifier's accuracy and a Frechet distance on its features."""
from __future__ import annotations

import logging
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from d2c_export.backends import open_backend
from d2c_export.engines import Engines
from d2c_export.errors import BadInput
from d2c_export.generate import check_stages, generate_images
from d2c_export.sources import DEMO_CHECKPOINT
from d2c_export.backends import Target
from reference.pipeline import SamplingParams
from training.classifier import ShapesClassifier
from training.data import NUM_CLASSES, make_dataset

log = logging.getLogger(__name__)

DEFAULT_CLASSIFIER = DEMO_CHECKPOINT.parent / "shapes-classifier.safetensors"  # trained with the demo
HELD_OUT_SEED = 20_000  # the real images of the Frechet distance; training uses small seeds
# A backend passes when its accuracy (percentage points) and Frechet distance are this close to the reference's.
MAX_ACCURACY_DROP = 3.0
MAX_FD_RISE = 3.0
MAX_PER_CLASS = 10_000  # samples (and held-out real images) per class the gate takes at most: all are held in memory


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
    sampler: str | None = None  # the named sampler set (`reference.samplers.SAMPLER_SETS`) where samplers are compared
    pixel_distance: float | None = None  # mean |difference| on [-1, 1] to the first sampler's images, same seeds

    @property
    def name(self) -> str:
        return self.backend if self.sampler is None else f"{self.backend} {self.sampler}"


def quality_labels(per_class: int) -> list[int]:
    """`per_class` images of every class, classes interleaved (so any prefix covers the classes evenly)."""
    return [c for _ in range(per_class) for c in range(NUM_CLASSES)]


def sample_quality(stages, labels: list[int], params: SamplingParams, seed: int, classifier: ShapesClassifier,
                   reference: np.ndarray, progress: bool | str = False,
                   done: Callable[[int], object] | None = None) -> tuple[float, float, Tensor]:
    """Generate `labels` in batches of the stages' max batch (batch i seeded seed + i), calling `done(images)` after
    each; returns (accuracy %, Frechet distance, images)."""
    batch = stages.max_batch
    chunks = []
    for i in range(0, len(labels), batch):
        result, _ = generate_images(stages, labels[i:i + batch], params, seed + i // batch, progress)
        chunks.append(result.images)
        if done is not None:
            done(len(result.images))
    images = torch.cat(chunks)
    return (*score_images(classifier, images, labels, reference), images)


def score_images(classifier: ShapesClassifier, images: Tensor, labels: list[int],
                 reference: np.ndarray) -> tuple[float, float]:
    """(accuracy %, Frechet distance against `reference` features) of images (B, 3, H, W) in [-1, 1]."""
    predicted, features = classify(classifier, images)
    accuracy = 100.0 * float((predicted == torch.tensor(labels)).float().mean())
    return accuracy, frechet_distance(features.numpy(), reference)


def evaluate_samples(name: str, pixels: np.ndarray, labels: list[int], description: str,
                     classifier: ShapesClassifier, real_per_class: int) -> QualityReport:
    """The quality of generated images, uint8 (N, H, W, 3) with their labels (a `d2c-generate` directory read by
    `bulk.pack.read_directory`), scored as a backend's are."""
    if max(labels) >= classifier.num_classes:
        raise BadInput(f"{name} has class {max(labels)}, the classifier {classifier.num_classes} classes: "
                       "score samples of the model the classifier was trained with")
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # uint8 (N, H, W, 3) -> [-1, 1]
    accuracy, fd = score_images(classifier, images, labels, real_features(classifier, real_per_class))
    log.info("%s: accuracy %.1f%%, Frechet %.3f (%s)", name, accuracy, fd, description)
    return QualityReport(name, description, len(labels), accuracy, fd)


def evaluate_backends(engines: Engines, targets: list[Target], per_class: int, params: SamplingParams, seed: int,
                      classifier: ShapesClassifier, real_per_class: int, threads: int = 0,
                      progress: bool = False, samplers: list[str] | None = None) -> tuple[list[QualityReport], Tensor]:
    """Quality of every target on the same labels and seeds; returns the reports and the first one's images.

    With `samplers` (names of `reference.samplers.SAMPLER_SETS`), every target samples once per named set of
    settings over `params`, and each report gives its mean pixel distance to the first set's images.
    """
    if engines.config.num_classes != classifier.num_classes:
        raise BadInput(f"the model has {engines.config.num_classes} classes, the classifier "
                       f"{classifier.num_classes}: use the checkpoint the classifier was trained with")
    variants = {name: params.with_sampler_set(name) for name in samplers} if samplers else {None: params}
    reports, first = [], None
    with ExitStack() as opened:
        backends = [opened.enter_context(open_backend(engines, t, threads)) for t in targets]  # all before sampling
        for backend in backends:  # every setting each backend cannot run refused before any sampling
            for settings in variants.values():
                check_stages(backend, settings)
        reference = real_features(classifier, real_per_class)
        labels = quality_labels(per_class)
        overall = opened.enter_context(tqdm(total=len(targets) * len(variants) * len(labels), unit="img",
                                            disable=not progress, desc=f"d2c-quality: {len(targets)} backend(s) x "
                                            f"{len(variants)} sampler(s) x {len(labels)} images"))
        for target, backend in zip(targets, backends):
            baseline = None
            for sampler, settings in variants.items():
                acc, fd, images = sample_quality(backend, labels, settings, seed, classifier, reference,
                                                 progress and "d2c-quality", overall.update)
                baseline = images if baseline is None else baseline
                distance = None if sampler is None else float((images - baseline).abs().mean())
                reports.append(QualityReport(target.name, backend.description, len(labels), acc, fd, sampler,
                                             distance))
                log.info("%s: accuracy %.1f%%, Frechet %.3f (%s)", reports[-1].name, acc, fd, backend.description)
                first = images if first is None else first
    return reports, first


def gate_failures(reports: list[QualityReport], max_drop: float = MAX_ACCURACY_DROP,
                  max_rise: float = MAX_FD_RISE) -> list[str]:
    """One line per backend whose figures are worse than the first report's (the reference) by more than allowed."""
    ref = reports[0]
    out = []
    for r in reports[1:]:
        if ref.accuracy - r.accuracy > max_drop:
            out.append(f"{r.name}: accuracy {r.accuracy:.1f}% is {ref.accuracy - r.accuracy:.1f} points below "
                       f"{ref.name}'s {ref.accuracy:.1f}% (allowed {max_drop})")
        if r.frechet - ref.frechet > max_rise:
            out.append(f"{r.name}: Frechet {r.frechet:.2f} is {r.frechet - ref.frechet:.2f} above "
                       f"{ref.name}'s {ref.frechet:.2f} (allowed {max_rise})")
    return out


def below_floor(reports: list[QualityReport], min_accuracy: float | None) -> list[str]:
    """One line per backend whose accuracy is below `min_accuracy` percent (none when it is None)."""
    if min_accuracy is None:
        return []
    return [f"{r.backend}: accuracy {r.accuracy:.1f}% is below the floor {min_accuracy:g}% (--min-accuracy)"
            for r in reports if r.accuracy < min_accuracy]


def markdown(reports: list[QualityReport]) -> str:
    """The reports as a Markdown table (with each sampler set's pixel distance where samplers are compared)."""
    if all(r.sampler is None for r in reports):
        lines = ["| backend | images | accuracy % | Frechet | runtime |", "|---|---:|---:|---:|---|"]
        lines += [f"| {r.backend} | {r.images} | {r.accuracy:.1f} | {r.frechet:.3f} | {r.description} |"
                  for r in reports]
        return "\n".join(lines)
    lines = ["| backend | sampler | images | accuracy % | Frechet | mean pixel distance to the first | runtime |",
             "|---|---|---:|---:|---:|---:|---|"]
    lines += [f"| {r.backend} | {r.sampler} | {r.images} | {r.accuracy:.1f} | {r.frechet:.3f} | "
              f"{r.pixel_distance:.4f} | {r.description} |" for r in reports]
    return "\n".join(lines)
