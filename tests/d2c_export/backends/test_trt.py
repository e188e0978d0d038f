"""The TensorRT path: profiles, manifest entries, plan refusal, lazy imports and errors here; build, load and
parity where TensorRT and a CUDA device exist (marked `trt`)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from d2c_export.backends import open_backend, open_named
from d2c_export.backends.trt import check_plan, trt_usable
from d2c_export.cli import export_main, run_main
from d2c_export.engines import Engines
from d2c_export.errors import EngineError
from d2c_export.manifest import MANIFEST, StageEntry
from d2c_export.export.trt_build import input_profiles, plan_entry, plan_name
from d2c_export.stages import STAGES, stages_for
from d2c_export.backends import Precision, Target
from d2c_export.trt_platform import platform_mismatch, tensorrt_missing
from reference.files import sha256_file
from reference.model import get_config
from tests.d2c_export.cli_helpers import assert_one_line_error, run_cli

PLATFORM = {"version": "10.12.0.36", "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
NO_TRT = tensorrt_missing()
needs_trt = pytest.mark.skipif(NO_TRT is not None, reason=f"needs TensorRT and a CUDA device: {NO_TRT}")


def fake_plan(directory, stage: str = "vae", precision: str = "fp16", platform: dict = PLATFORM) -> Engines:
    """Record a plan file for `stage` in `directory` as if `d2c-export trt` had built it on `platform`."""
    engines = Engines.open(directory)
    source = engines.manifest.stages[stage]["onnx-fp32"]
    plan = directory / plan_name(stage, precision)
    plan.write_bytes(b"serialized plan of " + stage.encode())
    entry = plan_entry(source, source.main_file, plan.name, sha256_file(plan), precision, platform, {})
    engines.manifest.stages[stage][f"trt-{precision}"] = entry
    engines.manifest.save(directory)
    return Engines.open(directory)


@pytest.mark.parametrize("stage", ["gpt", "mar", "diffusion", "vae"])
def test_profiles_come_from_the_stage_spec(engines_factory, stage):
    engines = Engines.open(engines_factory("d2c-tiny"))
    entry, config = engines.entry(stage, "onnx-fp32"), engines.config
    profiles = input_profiles(entry)
    spec = STAGES[stage]
    axes = spec.profile(config, engines.max_batch)
    dynamic = [t for t in spec.input_specs(config) if t.dynamic_axes]
    assert set(profiles) == {t.name for t in dynamic}
    for t in dynamic:
        for k in range(3):
            assert profiles[t.name][k] == tuple(axes[d][k] if isinstance(d, str) else d for d in t.shape)
    if stage == "gpt":
        g = config.gpt
        for name in ("k_cache_0", f"v_cache_{g.n_layer - 1}"):  # one input per layer, guided rows at most
            assert profiles[name][2] == (2 * engines.max_batch, g.n_head, g.max_seq_len, g.head_dim)
    if stage == "mar":
        assert profiles["kept"][0] == (1, 0)  # the first masked step keeps nothing


def test_profile_without_axis_is_refused():
    entry = StageEntry(files={"x.onnx": "0"}, precision="fp32", profile={},
                       inputs=[{"name": "x", "dtype": "float32", "shape": ["batch", 3]}], outputs=[])
    with pytest.raises(EngineError, match="batch"):
        input_profiles(entry)


def test_plan_entry_records_platform_and_source(engines_factory):
    source = Engines.open(engines_factory("d2c-tiny")).entry("vae", "onnx-fp32")
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
    engines = fake_plan(tiny_engines_copy, "vae", "fp32")
    entry = engines.entry("vae", "trt-fp32")
    check_plan(engines, "vae", entry, dict(PLATFORM))  # same platform, same graph: accepted
    with pytest.raises(EngineError, match=r"another TensorRT/GPU .*d2c-export trt --engines"):
        check_plan(engines, "vae", entry, {**PLATFORM, "version": "11.1.0"})
    with pytest.raises(EngineError, match="NVIDIA L4"):
        check_plan(engines, "vae", entry, {**PLATFORM, "gpu": "NVIDIA L4"})
    engines.manifest.stages["vae"]["onnx-fp32"].files["vae.onnx"] = "0" * 64  # the graph was re-exported since
    with pytest.raises(EngineError, match="older vae.onnx"):
        check_plan(engines, "vae", entry, dict(PLATFORM))
    (tiny_engines_copy / plan_name("vae", "fp32")).write_bytes(b"changed")
    with pytest.raises(EngineError, match="sha256.*d2c-export trt --engines"):
        Engines.open(tiny_engines_copy).entry("vae", "trt-fp32")


def test_plans_of_every_stage_are_needed(tiny_engines_copy):
    engines = fake_plan(tiny_engines_copy, "vae")
    assert not engines.has("trt-fp16")
    for spec in stages_for(engines.config):
        engines = fake_plan(tiny_engines_copy, spec.name)
    assert engines.has("trt-fp16") and not engines.has("trt-fp32")


def test_tensorrt_is_imported_lazily():
    code = ("import sys, d2c_export.backends, d2c_export.export.trt_build, d2c_export.backends.trt, "
            "d2c_export.verify.parity, d2c_export.cli; print('tensorrt' in sys.modules, 'polygraphy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


def test_trt_command_says_what_is_missing(tiny_engines_copy, capsys, without_tensorrt):
    before = json.loads((tiny_engines_copy / MANIFEST).read_text())
    code, err = run_cli(export_main, ["trt", "--fp16", "--engines", str(tiny_engines_copy)], capsys)
    assert_one_line_error(code, err, without_tensorrt, "d2c-export trt")
    assert json.loads((tiny_engines_copy / MANIFEST).read_text()) == before
    assert not list(tiny_engines_copy.glob("*.plan")) and not list(tiny_engines_copy.glob("*.fp16.onnx"))


def test_backend_trt_is_refused_without_fallback(tiny_engines_copy, tmp_path, capsys, without_tensorrt):
    out = tmp_path / "img.png"
    code, err = run_cli(run_main, ["--engines", str(tiny_engines_copy), "--class", "1", "--backend", "trt",
                                   "--out", str(out), "--quiet"], capsys)
    assert_one_line_error(code, err, without_tensorrt, "--backend ort")
    assert not out.exists()


def test_auto_picks_onnx_runtime_without_tensorrt(tiny_engines_copy, without_tensorrt):
    for spec in stages_for(Engines.open(tiny_engines_copy).config):
        engines = fake_plan(tiny_engines_copy, spec.name, "fp32")
    assert engines.has("trt-fp32") and not trt_usable(engines, Precision.FP32)
    with open_named(engines, "auto", "fp32") as backend:
        assert backend.description.startswith("ONNX Runtime")


# -- where TensorRT and a GPU exist ------------------------------------------------------------------
@pytest.fixture(scope="module")
def built(engines_factory, tmp_path_factory):
    from d2c_export.export.trt_build import build_engines
    directory = tmp_path_factory.mktemp("trt_tiny")
    shutil.copytree(engines_factory("d2c-tiny"), directory, dirs_exist_ok=True)
    build_engines(Engines.open(directory), fp16=True, progress=False)
    build_engines(Engines.open(directory), fp16=False, progress=False)
    return directory


@pytest.mark.trt
@needs_trt
def test_build_writes_plans_and_manifest(built):
    import tensorrt as trt

    from d2c_export.trt_platform import running_platform
    engines = Engines.open(built)
    for spec in stages_for(engines.config):
        for precision in ("fp16", "fp32"):
            entry = engines.entry(spec.name, f"trt-{precision}")
            assert entry.main_file == plan_name(spec.name, precision)
            assert {k: entry.tensorrt[k] for k in ("version", "gpu", "compute_capability")} == running_platform(trt)
    assert (built / "timing.cache").stat().st_size > 0


@pytest.mark.trt
@needs_trt
@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_plans_match_the_reference(built, precision):
    """The one parity path, on the real plans; every shape twice, so captured graphs replay."""
    from d2c_export.verify.parity import check_stage
    engines = Engines.open(built)
    with open_backend(engines, Target.of("trt", precision)) as backend:
        for _ in range(2):
            for spec in stages_for(engines.config):
                reports = check_stage(engines.model(), spec, backend, engines.max_batch)
                assert reports and all(r.passed for r in reports), [r for r in reports if not r.passed]


@pytest.mark.trt
@needs_trt
def test_generation_on_trt(built):
    from d2c_export.generate import generate_images
    from reference.pipeline import SamplingParams
    with open_named(Engines.open(built), "auto", "fp16") as backend:
        assert backend.description.startswith("TensorRT")
        result, timer = generate_images(backend, [1, 2], SamplingParams(num_iter=2, diffusion_steps=5), seed=0)
    assert bool(torch.isfinite(result.images).all()) and timer.calls["diffusion"] == 10


@pytest.mark.trt
@needs_trt
def test_stale_and_changed_plans_are_refused_at_load(built, tmp_path):
    from d2c_export.backends.trt import TrtBackend
    directory = tmp_path / "engines"
    shutil.copytree(built, directory)
    data = json.loads((directory / MANIFEST).read_text())
    data["stages"]["vae"]["trt-fp16"]["tensorrt"]["version"] = "9.0.0"
    (directory / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(EngineError, match="d2c-export trt --fp16 --engines"):
        TrtBackend(Engines.open(directory), Precision.FP16)
    (directory / plan_name("gpt", "fp16")).write_bytes(b"not a plan")
    with pytest.raises(EngineError, match="sha256"):
        TrtBackend(Engines.open(directory), Precision.FP16)


def test_plans_are_tuned_for_the_shapes_that_run(tiny, fake):
    """7c: TensorRT tunes its kernels for the profile's opt shapes: a gpt decode step (one token, a full guided batch)
    and the rows a full batch's masked step denoises under the model's recommended sampling."""
    from d2c_export.backends.trt import TrtBackend
    from reference.pipeline import SamplingParams
    from reference.sampling import step_positions
    config, max_batch = tiny.config, tiny.max_batch
    device, trt_module = fake
    with TrtBackend(tiny, Precision.FP32, trt=trt_module, device=device) as trt:
        gpt, diffusion = (trt.engines[s].engine.profile for s in ("gpt", "diffusion"))
    params = SamplingParams(**SamplingParams.recommended_for(config))
    seq_len = config.mar.seq_len
    steps = step_positions(torch.arange(seq_len)[None], seq_len, params.num_iter)
    rows = sorted(max_batch * pred.shape[1] for _, pred in steps)
    groups = 2 if params.cfg != 1.0 else 1
    assert gpt["ids"][1] == (groups * max_batch, 1) and gpt["input_pos"][1] == (1,)
    n = diffusion["x"][1][0]
    assert rows[0] <= n <= 1.25 * rows[-1], (n, rows)
    assert diffusion["z"][1][0] == groups * n


def test_d2c_b_is_tuned_for_what_batch_16_denoises():
    """At max batch 16 d2c-b's masked steps denoise 64 to 112 rows (64 steps over 256 tokens)."""
    config = get_config("d2c-b")
    tuned = STAGES["diffusion"].tuned_sizes(config, 16)
    assert 64 <= tuned["n"] <= 112 and tuned["m"] == 2 * tuned["n"]
    assert STAGES["gpt"].tuned_sizes(config, 16) == {"rows": 32, "tokens": 1}
