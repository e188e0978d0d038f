"""The quality gate: the Frechet distance math, and the demo's samples on every CPU backend against the reference."""
from __future__ import annotations

import json

import numpy as np
import pytest

from d2c_export.cli import quality_main
from d2c_export.engines import Engines
from d2c_export.sources import DEMO_CHECKPOINT
from d2c_export.backends import parse_list
from d2c_export.verify.quality import (DEFAULT_CLASSIFIER, MAX_ACCURACY_DROP, MAX_FD_RISE, QualityReport,
                                       below_floor, evaluate_backends, frechet_distance, gate_failures)
from reference.pipeline import SamplingParams
from training.classifier import load_classifier

CHEAP = SamplingParams(cfg=1.0, num_iter=4, diffusion_steps=500)  # what CI affords; the README lists full figures
PER_CLASS = 5
MIN_REFERENCE_ACCURACY = 80.0  # the demo at CHEAP settings (90+ at the README's settings)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_frechet_distance_matches_the_closed_form():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4000, 3)) * [1.0, 2.0, 0.5]
    y = rng.normal(size=(5000, 3)) * [1.5, 1.0, 0.5] + [1.0, 0.0, -2.0]
    # sample moments, with tr sqrt(C1 C2) from the eigenvalues of the (non-symmetric) product
    c1, c2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    d = x.mean(0) - y.mean(0)
    expected = d @ d + np.trace(c1) + np.trace(c2) - 2 * np.sqrt(np.linalg.eigvals(c1 @ c2).real).sum()
    assert frechet_distance(x, y) == pytest.approx(expected, rel=1e-9)
    # population value: |mu1 - mu2|^2 + sum (s1 - s2)^2 for diagonal covariances
    assert frechet_distance(x, y) == pytest.approx(1.0 + 4.0 + 0.25 + 1.0, rel=0.05)
    assert abs(frechet_distance(x, x)) < 1e-8


def test_frechet_distance_rejects_mismatched_features():
    with pytest.raises(ValueError, match="same D"):
        frechet_distance(np.zeros((5, 3)), np.zeros((5, 4)))


def test_gate_flags_only_what_is_worse_than_allowed():
    ref = QualityReport("torch", "", 50, 96.0, 2.0)
    ok = QualityReport("ort", "", 50, 96.0 - MAX_ACCURACY_DROP, 2.0 + MAX_FD_RISE)
    worse = QualityReport("ort-fp16", "", 50, 96.0 - MAX_ACCURACY_DROP - 1, 2.0 + MAX_FD_RISE + 1)
    assert gate_failures([ref, ok]) == []
    failures = gate_failures([ref, ok, worse])
    assert len(failures) == 2 and all(line.startswith("ort-fp16:") for line in failures)


def test_accuracy_floor_flags_each_backend_below_it():
    reports = [QualityReport("ort", "", 50, 96.0, 40.0), QualityReport("ort-fp16", "", 50, 89.9, 40.0)]
    assert below_floor(reports, None) == []
    assert below_floor(reports, 89.9) == []
    (line,) = below_floor(reports, 90.0)
    assert line.startswith("ort-fp16: accuracy 89.9%") and "--min-accuracy" in line


@pytest.fixture(scope="module")
def demo_engines(demo_fp16_engines):
    """The shipped demo checkpoint (the default source of `d2c-export onnx`), exported with FP16 graphs."""
    engines = Engines.open(demo_fp16_engines)
    assert engines.source["checkpoint"] == str(DEMO_CHECKPOINT)
    assert engines.has("onnx-fp16") and engines.max_batch >= PER_CLASS * 10
    return demo_fp16_engines


def test_every_cpu_backend_keeps_the_reference_quality(demo_engines):
    classifier = load_classifier(DEFAULT_CLASSIFIER)
    reports, images = evaluate_backends(Engines.open(demo_engines), parse_list("torch,ort,ort-fp16"), PER_CLASS, CHEAP,
                                        0, classifier, real_per_class=30, threads=1)
    assert [r.backend for r in reports] == ["torch", "ort", "ort-fp16"]
    assert images.shape == (PER_CLASS * 10, 3, 16, 16)
    assert reports[0].accuracy >= MIN_REFERENCE_ACCURACY, reports[0]
    assert gate_failures(reports) == [], reports


def test_quality_cli_writes_reports(demo_engines, tmp_path, capsys):
    out = tmp_path / "quality.json"
    grid = tmp_path / "grid.png"
    rc = quality_main(["--engines", str(demo_engines), "--backends", "torch,ort", "--per-class", "2",
                       "--real-per-class", "10", "--num-iter", "2", "--diffusion-steps", "20", "--threads", "1",
                       "--json", str(out), "--grid", str(grid), "--quiet"])
    data = json.loads(out.read_text())
    # ONNX Runtime FP32 samples the reference's discrete tokens and images: equal figures, so the gate passes
    assert rc == 0 and data["failures"] == [], data
    assert data["reports"][0]["accuracy"] == data["reports"][1]["accuracy"]
    assert [r["backend"] for r in data["reports"]] == ["torch", "ort"]
    assert all(r["images"] == 20 and 0.0 <= r["accuracy"] <= 100.0 for r in data["reports"])
    assert grid.stat().st_size > 0
    assert "| torch | 20 |" in capsys.readouterr().out


def test_missing_fp16_graphs_are_one_clear_error(engines_factory, capsys):
    rc = quality_main(["--engines", str(engines_factory("d2c-tiny")), "--backends", "torch,ort-fp16", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert err[0].startswith("error:") and "onnx-fp16" in err[0] and "--fp16" in err[0]


def test_unknown_backend_is_refused(engines_factory, capsys):
    rc = quality_main(["--engines", str(engines_factory("d2c-tiny")), "--backends", "torch,cuda", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "unknown backend 'cuda'" in err and len(err.strip().splitlines()) == 1


def test_quality_cli_compares_sampler_sets_on_the_same_seeds(demo_engines, tmp_path, capsys):
    out = tmp_path / "quality.json"
    rc = quality_main(["--engines", str(demo_engines), "--backends", "ort", "--samplers", "exact,anneal,fast",
                       "--per-class", "1", "--real-per-class", "10", "--num-iter", "4", "--threads", "1",
                       "--json", str(out), "--quiet"])
    data = json.loads(out.read_text())
    assert [(r["backend"], r["sampler"]) for r in data["reports"]] == [("ort", "exact"), ("ort", "anneal"),
                                                                        ("ort", "fast")]
    distances = [r["pixel_distance"] for r in data["reports"]]
    assert distances[0] == 0.0 and distances[1] > 0.0 and distances[2] > 0.0  # other images from the same draws
    # the demo's own floor, the fewest denoising steps that hold its quality gate, above half its 500 steps
    assert data["samplers"]["anneal"]["diffusion_floor"] == 300
    assert data["samplers"]["anneal"]["diffusion_anneal_start"] == 300
    fast = data["samplers"]["fast"]  # unguided: the token cache without the condition cache
    assert fast["diffusion_anneal"] == "linear" and fast["lazy_mar"] == 9 and fast["lazy_mar_tokens"]
    assert rc in (0, 1) and "| ort | anneal | 10 |" in capsys.readouterr().out


def test_quality_cli_refuses_sampler_sets_that_cannot_run(demo_engines, tmp_path, capsys):
    out = tmp_path / "quality.json"
    rc = quality_main(["--engines", str(demo_engines), "--backends", "ort", "--samplers", "exact,quick",
                       "--json", str(out), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--samplers" in err[0] and "exact, anneal, lazy, fast" in err[0]
    assert not out.exists()
