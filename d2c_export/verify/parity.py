"""Per-stage parity of a backend against the reference modules under teacher forcing: the one parity path.

Every stage's example inputs at its parity shapes go through `backend.run(stage, inputs)` and through
the stage's reference module; each output is compared with scale-free metrics against the limits the
stage's spec states for the engine kind (`StageSpec.tolerance`). ONNX Runtime graphs and TensorRT plans
are checked the same way.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from d2c_export.backends import open_backend
from d2c_export.backends.base import Backend
from d2c_export.engines import Engines
from d2c_export.stages import StageSpec, Tolerance
from d2c_export.backends import BACKENDS, Precision, Target
from reference.model import D2C
from reference.stage_networks import as_outputs

log = logging.getLogger(__name__)


@dataclass
class Comparison:
    """How far `got` is from `ref`: scale-free metrics, so large latents and small logits compare alike."""

    max_abs: float
    max_rel: float
    rel_l2: float
    cosine: float
    finite: bool

    def within(self, tol: Tolerance) -> bool:
        return self.finite and self.max_rel <= tol.max_rel and self.rel_l2 <= tol.rel_l2 \
            and self.cosine >= tol.min_cosine


def compare(got: np.ndarray, ref: np.ndarray) -> Comparison:
    g, r = np.asarray(got, dtype=np.float64).ravel(), np.asarray(ref, dtype=np.float64).ravel()
    if g.shape != r.shape:
        raise ValueError(f"shape mismatch: {np.shape(got)} vs {np.shape(ref)}")
    finite = bool(np.isfinite(g).all())
    diff = np.abs(g - r)
    max_abs = float(diff.max()) if diff.size else 0.0
    scale = float(np.abs(r).max()) if r.size else 0.0
    norm_r, norm_g = float(np.linalg.norm(r)), float(np.linalg.norm(g))
    rel_l2 = float(np.linalg.norm(g - r) / norm_r) if norm_r > 0 else float(np.linalg.norm(g - r))
    cosine = float(g @ r / (norm_g * norm_r)) if norm_g > 0 and norm_r > 0 else float(norm_g == norm_r)
    return Comparison(max_abs, max_abs / scale if scale > 0 else max_abs, rel_l2, cosine, finite)


@dataclass
class StageReport:
    stage: str
    kind: str  # the engine kind checked ("onnx-fp32", "trt-fp16", ...)
    sizes: dict[str, int]
    output: str
    result: Comparison
    passed: bool


@torch.no_grad()
def check_stage(model: D2C, spec: StageSpec, backend: Backend, max_batch: int, seed: int = 0) -> list[StageReport]:
    """Run `backend` and the reference module on the same inputs at the spec's parity shapes; compare every output."""
    config = model.config
    module = spec.wrapper(model).eval()
    kind = backend.target.parity_kind
    tol = spec.tolerance(kind)
    reports = []
    for i, sizes in enumerate(spec.parity_cases(config, max_batch)):
        feeds = spec.example_inputs(config, sizes, seed=seed + i, max_batch=max_batch)
        ref = as_outputs(module(*feeds.values()))
        got = backend.run(spec.name, feeds)
        for t, r, g in zip(spec.output_specs(config), ref, got):
            result = compare(g.float().cpu().numpy(), r.numpy())
            reports.append(StageReport(spec.name, kind, sizes, t.name, result, result.within(tol)))
    return reports


def check_targets(engines: Engines, precision: Precision) -> list[Target]:
    """What `d2c-export check --precision P` compares: every registered backend that runs P, those that must
    (`BackendSpec.checked_unbuilt`: the ONNX graphs) first; others where their files are built and this machine
    runs them (TensorRT plans); the reference modules only at reduced precision (FP16 / BF16 weights)."""
    targets = []
    for spec in sorted(BACKENDS.values(), key=lambda s: not s.checked_unbuilt):
        if precision not in spec.precisions or (spec.is_reference and precision is Precision.FP32):
            continue
        target = Target(spec.name, precision)
        if spec.checked_unbuilt:
            targets.append(target)
        elif target.kind is None or engines.has(target.kind):
            reason = spec.missing()
            if reason:
                log.warning("%s not compared: %s", target.kind or target.name, reason)
            else:
                targets.append(target)
    return targets


def check_engines(engines: Engines, targets: list[Target]) -> list[StageReport]:
    """Parity of every stage of every target against the reference rebuilt (once) from the manifest's source."""
    model = engines.model()
    reports = []
    for target in targets:
        with open_backend(engines, target, keep_fp16_rounding=True) as backend:
            for spec in engines.specs(kind=target.kind):
                reports.extend(check_stage(model, spec, backend, engines.max_batch))
    return reports


def format_table(reports: list[StageReport]) -> str:
    header = f"{'stage':<10} {'kind':<10} {'output':<12} {'shape':<34} {'max abs':>10} {'max rel':>10} {'rel L2':>10} {'cosine':>10}  result"
    lines = [header, "-" * len(header)]
    for r in reports:
        sizes = ",".join(f"{k}={v}" for k, v in r.sizes.items())
        c = r.result
        lines.append(f"{r.stage:<10} {r.kind:<10} {r.output:<12} {sizes:<34} {c.max_abs:>10.2e} {c.max_rel:>10.2e} "
                     f"{c.rel_l2:>10.2e} {c.cosine:>10.7f}  {'pass' if r.passed else 'FAIL'}")
    return "\n".join(lines)
