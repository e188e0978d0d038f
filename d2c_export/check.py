"""Per-stage parity of exported graphs against the reference modules, under teacher forcing."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from d2c_export.manifest import Manifest
from d2c_export.runtime import OrtStage
from d2c_export.sources import model_from_source
from d2c_export.stages import FP16_TOLERANCE, StageSpec, Tolerance, stages_for
from reference.model import D2C, D2CConfig


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


def psnr(got: np.ndarray, ref: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of images in [-1, 1] (peak: the full range); inf when equal."""
    mse = float(np.mean((np.asarray(got, dtype=np.float64) - np.asarray(ref, dtype=np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(4.0 / mse)


def parity_sizes(spec: StageSpec, config: D2CConfig) -> list[dict[str, int]]:
    """The export example's sizes plus two others: the profile minimum and an odd size above opt."""
    profile = spec.profile(config)
    smallest = {a: max(lo, 1) if a != "kept_len" else lo for a, (lo, _, _) in profile.items()}
    odd = {a: min(hi, opt + 1) for a, (_, opt, hi) in profile.items()}
    if spec.name == "diffusion":
        odd["m"] = odd["n"]  # unguided layout; the opt example is guided
    return [{a: opt for a, (_, opt, _) in profile.items()}, smallest, odd]


@dataclass
class StageReport:
    stage: str
    sizes: dict[str, int]
    output: str
    result: Comparison
    passed: bool


@torch.no_grad()
def check_stage(model: D2C, spec: StageSpec, session: OrtStage, tolerance: Tolerance | None = None,
                sizes_list: list[dict[str, int]] | None = None, seed: int = 0) -> list[StageReport]:
    """Run the graph and the reference wrapper on the same inputs at several shapes; compare every output."""
    config = model.config
    wrapper = spec.wrapper(model).eval()
    tol = tolerance or spec.tolerance
    reports = []
    for i, sizes in enumerate(sizes_list or parity_sizes(spec, config)):
        feeds = spec.example_inputs(config, sizes, seed=seed + i)
        inputs = spec.input_specs(config)
        ref = wrapper(*(feeds[t.name] for t in inputs))
        ref = ref if isinstance(ref, tuple) else (ref,)
        got = session.run({t.name: feeds[t.name].numpy() for t in inputs})
        for t, r in zip(spec.output_specs(config), ref):
            result = compare(got[t.name], r.numpy())
            reports.append(StageReport(spec.name, sizes, t.name, result, result.within(tol)))
    return reports


def check_engines(engines: str | Path, precision: str = "fp32") -> list[StageReport]:
    """Parity of every stage in `engines` against the reference rebuilt from the manifest's source."""
    engines = Path(engines)
    manifest = Manifest.load(engines)
    model = model_from_source(manifest.d2c_config, manifest.source)
    reports = []
    for spec in stages_for(model.config):
        entry = manifest.entry(spec.name, f"onnx-{precision}", engines)
        session = OrtStage(engines / entry.main_file, ["CPUExecutionProvider"], optimize=precision == "fp32")
        reports.extend(check_stage(model, spec, session, None if precision == "fp32" else FP16_TOLERANCE))
    return reports


def format_table(reports: list[StageReport]) -> str:
    header = f"{'stage':<10} {'output':<12} {'shape':<34} {'max abs':>10} {'max rel':>10} {'rel L2':>10} {'cosine':>10}  result"
    lines = [header, "-" * len(header)]
    for r in reports:
        sizes = ",".join(f"{k}={v}" for k, v in r.sizes.items())
        c = r.result
        lines.append(f"{r.stage:<10} {r.output:<12} {sizes:<34} {c.max_abs:>10.2e} {c.max_rel:>10.2e} "
                     f"{c.rel_l2:>10.2e} {c.cosine:>10.7f}  {'pass' if r.passed else 'FAIL'}")
    return "\n".join(lines)
