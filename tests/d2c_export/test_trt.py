"""The TensorRT path: profiles, manifest entries, plan refusal, lazy imports and errors here; build, load and
parity where TensorRT and a CUDA device exist (marked `trt`)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from d2c_export.cli import export_main, run_main
from d2c_export.manifest import MANIFEST, EngineError, Manifest, StageEntry, sha256_file
from d2c_export.runtime import OrtStage, open_backend
from d2c_export.stages import FP16_TOLERANCE, STAGES, stages_for
from d2c_export.trt_backend import check_plan, platform_mismatch, plans_present, trt_usable
from d2c_export.trt_build import input_profiles, plan_entry, plan_name, tensorrt_missing
from tests.d2c_export.test_errors import assert_one_line_error, run_cli

PLATFORM = {"version": "10.12.0.36", "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
NO_TRT = tensorrt_missing()
needs_trt = pytest.mark.skipif(NO_TRT is not None, reason=f"needs TensorRT and a CUDA device: {NO_TRT}")


def fake_plan(engines, stage: str = "vae", precision: str = "fp16", platform: dict = PLATFORM) -> Manifest:
    """Record a plan file for `stage` in `engines` as if `d2c-export trt` had built it on `platform`."""
    manifest = Manifest.load(engines)
    source = manifest.stages[stage]["onnx-fp32"]
    plan = engines / plan_name(stage, precision)
    plan.write_bytes(b"serialized plan of " + stage.encode())
    entry = plan_entry(source, source.main_file, plan.name, sha256_file(plan), precision, platform, {})
    manifest.stages[stage][f"trt-{precision}"] = entry
    manifest.save(engines)
    return manifest


@pytest.mark.parametrize("stage", ["gpt", "mar", "diffusion", "vae"])
def test_profiles_come_from_the_stage_spec(engines_factory, stage):
    manifest = Manifest.load(engines_factory("d2c-tiny"))
    entry, config = manifest.stages[stage]["onnx-fp32"], manifest.d2c_config
    profiles = input_profiles(entry)
    spec = STAGES[stage]
    axes = spec.profile(config, manifest.max_batch)
    dynamic = [t for t in spec.input_specs(config) if t.dynamic_axes]
    assert set(profiles) == {t.name for t in dynamic}
    for t in dynamic:
        for k in range(3):
            assert profiles[t.name][k] == tuple(axes[d][k] if isinstance(d, str) else d for d in t.shape)
    if stage == "gpt":
        g = config.gpt
        for name in ("k_cache_0", f"v_cache_{g.n_layer - 1}"):  # one input per layer, guided rows at most
            assert profiles[name][2] == (2 * manifest.max_batch, g.n_head, g.max_seq_len, g.head_dim)
    if stage == "mar":
        assert profiles["kept"][0] == (1, 0)  # the first masked step keeps nothing


def test_profile_without_axis_is_refused():
    entry = StageEntry(files={"x.onnx": "0"}, precision="fp32", profile={},
                       inputs=[{"name": "x", "dtype": "float32", "shape": ["batch", 3]}], outputs=[])
    with pytest.raises(EngineError, match="batch"):
        input_profiles(entry)


def test_plan_entry_records_platform_and_source(engines_factory):
    manifest = Manifest.load(engines_factory("d2c-tiny"))
    source = manifest.stages["vae"]["onnx-fp32"]
    entry = plan_entry(source, "vae.onnx", "vae.fp32.plan", "abc", "fp32", PLATFORM, {"workspace_gib": 4.0})
    assert entry.files == {"vae.fp32.plan": "abc"} and entry.precision == "fp32"
    assert {k: entry.tensorrt[k] for k in PLATFORM} == PLATFORM
    assert entry.tensorrt["onnx_sha256"] == source.files["vae.onnx"]
    assert (entry.inputs, entry.outputs, entry.profile) == (source.inputs, source.outputs, source.profile)


def test_platform_mismatch():
    assert platform_mismatch(PLATFORM, dict(PLATFORM)) is None
    assert "version" in platform_mismatch(PLATFORM, {**PLATFORM, "version": "11.0.0"})
    other = platform_mismatch(PLATFORM, {**PLATFORM, "gpu": "NVIDIA L4", "compute_capability": "8.9"})
    assert "gpu" in other and "compute_capability" in other and "version" not in other
    assert platform_mismatch(None, PLATFORM) is not None


def test_foreign_stale_and_changed_plans_are_refused(tiny_engines_copy):
    engines = tiny_engines_copy
    manifest = fake_plan(engines, "vae", "fp32")
    entry = manifest.entry("vae", "trt-fp32", engines)
    check_plan("vae", entry, dict(PLATFORM), engines, manifest)  # same platform, same graph: accepted
    with pytest.raises(EngineError, match=r"another TensorRT/GPU .*d2c-export trt --engines"):
        check_plan("vae", entry, {**PLATFORM, "version": "11.1.0"}, engines, manifest)
    with pytest.raises(EngineError, match="NVIDIA L4"):
        check_plan("vae", entry, {**PLATFORM, "gpu": "NVIDIA L4"}, engines, manifest)
    manifest.stages["vae"]["onnx-fp32"].files["vae.onnx"] = "0" * 64  # the graph was re-exported since
    with pytest.raises(EngineError, match="older vae.onnx"):
        check_plan("vae", entry, dict(PLATFORM), engines, manifest)
    (engines / plan_name("vae", "fp32")).write_bytes(b"changed")
    with pytest.raises(EngineError, match="sha256.*d2c-export trt --engines"):
        Manifest.load(engines).entry("vae", "trt-fp32", engines)


def test_plans_present_needs_every_stage(tiny_engines_copy):
    manifest = fake_plan(tiny_engines_copy, "vae")
    assert not plans_present(manifest, "fp16")
    for spec in stages_for(manifest.d2c_config):
        manifest = fake_plan(tiny_engines_copy, spec.name)
    assert plans_present(manifest, "fp16") and not plans_present(manifest, "fp32")


def test_tensorrt_is_imported_lazily():
    code = ("import sys, d2c_export.runtime, d2c_export.trt_build, d2c_export.trt_backend, d2c_export.trt_check, "
            "d2c_export.cli; print('tensorrt' in sys.modules, 'polygraphy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


@pytest.mark.skipif(NO_TRT is None, reason="TensorRT and a CUDA device are present here")
def test_trt_command_says_what_is_missing(tiny_engines_copy, capsys):
    before = json.loads((tiny_engines_copy / MANIFEST).read_text())
    code, err = run_cli(export_main, ["trt", "--fp16", "--engines", str(tiny_engines_copy)], capsys)
    assert_one_line_error(code, err, NO_TRT, "d2c-export trt")
    assert json.loads((tiny_engines_copy / MANIFEST).read_text()) == before
    assert not list(tiny_engines_copy.glob("*.plan")) and not list(tiny_engines_copy.glob("*.fp16.onnx"))


@pytest.mark.skipif(NO_TRT is None, reason="TensorRT and a CUDA device are present here")
def test_backend_trt_is_refused_without_fallback(tiny_engines_copy, tmp_path, capsys):
    out = tmp_path / "img.png"
    code, err = run_cli(run_main, ["--engines", str(tiny_engines_copy), "--class", "1", "--backend", "trt",
                                   "--out", str(out), "--quiet"], capsys)
    assert_one_line_error(code, err, NO_TRT, "--backend ort")
    assert not out.exists()


@pytest.mark.skipif(NO_TRT is None, reason="TensorRT and a CUDA device are present here")
def test_auto_picks_onnx_runtime_without_tensorrt(tiny_engines_copy):
    for spec in stages_for(Manifest.load(tiny_engines_copy).d2c_config):
        manifest = fake_plan(tiny_engines_copy, spec.name, "fp32")
    assert plans_present(manifest, "fp32") and not trt_usable(manifest, "fp32")
    _, description = open_backend(tiny_engines_copy, "auto")
    assert description.startswith("ONNX Runtime")


def test_comparator_runs_a_stage_against_ort_and_reference(engines_factory, tmp_path):
    """polygraphy's Comparator with an ONNX Runtime FP16 runner in the place of the TensorRT one."""
    pytest.importorskip("polygraphy", reason="polygraphy comes with the dev and trt extras")
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

    from d2c_export.fp16 import convert_engines
    from d2c_export.sources import model_from_source
    from d2c_export.trt_check import compare_runners
    engines = tmp_path / "engines"
    shutil.copytree(engines_factory("d2c-tiny"), engines)
    convert_engines(engines, ["diffusion"], progress=False)
    manifest = Manifest.load(engines)
    model = model_from_source(manifest.d2c_config, manifest.source)
    runner = OnnxrtRunner(SessionFromOnnx(str(engines / "diffusion.fp16.onnx")), name="onnxrt-fp16")
    reports = compare_runners(model, STAGES["diffusion"], runner, engines / "diffusion.onnx", FP16_TOLERANCE)
    assert sorted(r.output for r in reports) == ["x_prev/ort32"] * 3 + ["x_prev/ref"] * 3
    assert all(r.passed for r in reports)
    strict = compare_runners(model, STAGES["diffusion"], OnnxrtRunner(SessionFromOnnx(
        str(engines / "diffusion.fp16.onnx")), name="fp16"), engines / "diffusion.onnx",
        FP16_TOLERANCE.__class__(max_rel=0.0, rel_l2=0.0, min_cosine=1.0))
    assert not all(r.passed for r in strict)  # the tolerance function decides


# -- where TensorRT and a GPU exist ------------------------------------------------------------------
@pytest.fixture(scope="module")
def built(engines_factory, tmp_path_factory):
    from d2c_export.trt_build import build_engines
    engines = tmp_path_factory.mktemp("trt_tiny")
    shutil.copytree(engines_factory("d2c-tiny"), engines, dirs_exist_ok=True)
    build_engines(engines, fp16=True, progress=False)
    build_engines(engines, fp16=False, progress=False)
    return engines


@pytest.mark.trt
@needs_trt
def test_build_writes_plans_and_manifest(built):
    import tensorrt as trt

    from d2c_export.trt_build import running_platform
    manifest = Manifest.load(built)
    for spec in stages_for(manifest.d2c_config):
        for precision in ("fp16", "fp32"):
            entry = manifest.entry(spec.name, f"trt-{precision}", built)
            assert entry.main_file == plan_name(spec.name, precision)
            assert {k: entry.tensorrt[k] for k in ("version", "gpu", "compute_capability")} == running_platform(trt)
    assert (built / "timing.cache").stat().st_size > 0


@pytest.mark.trt
@needs_trt
@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_plans_match_onnx_runtime(built, precision):
    from d2c_export.check import compare, parity_sizes
    from d2c_export.trt_backend import TrtStages
    from d2c_export.trt_check import TRT_FP32_TOLERANCE
    manifest = Manifest.load(built)
    stages = TrtStages(built, manifest, precision)
    tol = FP16_TOLERANCE if precision == "fp16" else TRT_FP32_TOLERANCE
    for spec in stages_for(manifest.d2c_config):
        ort = OrtStage(built / manifest.stages[spec.name]["onnx-fp32"].main_file, ["CPUExecutionProvider"])
        for i, sizes in enumerate(parity_sizes(spec, manifest.d2c_config) * 2):  # twice: graph capture, replay
            feeds = spec.example_inputs(manifest.d2c_config, sizes, seed=i)
            ref = ort.run({k: v.numpy() for k, v in feeds.items()})
            got = stages.engines[spec.name].run({k: v.cuda() for k, v in feeds.items()})
            torch.cuda.synchronize()
            for name, value in got.items():
                result = compare(value.float().cpu().numpy(), ref[name])
                assert result.within(tol), (spec.name, sizes, name, result)


@pytest.mark.trt
@needs_trt
def test_generation_on_trt_keeps_device_tensors(built):
    stages, description = open_backend(built, "auto", "fp16")
    assert description.startswith("TensorRT")
    spec, config = STAGES["diffusion"], stages.config
    feeds = spec.example_inputs(config, seed=1)
    out = stages.diffusion(*(feeds[t.name].cuda() for t in spec.input_specs(config)))
    assert out.is_cuda and bool(torch.isfinite(out).all())
    from d2c_export.runtime import generate_images
    from reference.pipeline import SamplingParams
    result, timer = generate_images(stages, [1, 2], SamplingParams(num_iter=2, diffusion_steps=5), seed=0)
    assert bool(torch.isfinite(result.images).all()) and timer.calls["diffusion"] == 10


@pytest.mark.trt
@needs_trt
def test_stale_and_changed_plans_are_refused_at_load(built, tmp_path):
    from d2c_export.trt_backend import TrtStages
    engines = tmp_path / "engines"
    shutil.copytree(built, engines)
    data = json.loads((engines / MANIFEST).read_text())
    data["stages"]["vae"]["trt-fp16"]["tensorrt"]["version"] = "9.0.0"
    (engines / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(EngineError, match="d2c-export trt --fp16 --engines"):
        TrtStages(engines, Manifest.load(engines), "fp16")
    (engines / plan_name("gpt", "fp16")).write_bytes(b"not a plan")
    with pytest.raises(EngineError, match="sha256"):
        TrtStages(engines, Manifest.load(engines), "fp16")


@pytest.mark.trt
@needs_trt
def test_polygraphy_check_of_the_plans(built):
    from d2c_export.trt_check import check_plans
    reports = check_plans(built, "fp16")
    assert reports and all(r.passed for r in reports), [r for r in reports if not r.passed]
    assert np.isfinite([r.result.max_abs for r in reports]).all()
