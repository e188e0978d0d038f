"""The latency benchmark: FLOP formulas against counts by hand and by torch, and complete reports (no timed asserts)."""
from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

from d2c_export.bench.report import REPORT_FILES
from d2c_export.bench.roofline import matmul_roofline
from d2c_export.cli import bench_main
from d2c_export.engines import Engines
from d2c_export.sources import random_model
from d2c_export.stages import STAGES, StageSpec, stages_for
from d2c_export.stages.diffusion import diffusion_flops
from d2c_export.stages.gpt import gpt_flops
from reference.model import get_config
from tests.d2c_export.cli_helpers import assert_one_line_error, files_in

TINY_ARGS = ["--num-iter", "2", "--diffusion-steps", "3", "--repeat", "2", "--quiet"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def torch_count(model, spec, feeds) -> int:
    """FLOPs of one reference call as torch's own counter sees them (the inputs positionally, in input order).

    The call runs on fake tensors: the counter reads each op's shapes, so the count is the same as on real ones, without
    the arithmetic (d2c-b's VAE at 256 px is 500 GFLOP)."""
    assert list(feeds) == [t.name for t in spec.input_specs(model.config)], spec.name
    with FakeTensorMode(allow_non_fake_inputs=True), FlopCounterMode(display=False) as counter:
        spec.wrapper(model).eval()(*feeds.values())
    return counter.get_total_flops()


def formula_count(config, spec, feeds) -> int:
    """The stage's own formula from the input shapes, which must agree with its count from the tensors."""
    shapes = {k: tuple(v.shape) for k, v in feeds.items()}
    flops = spec.flops(config, shapes)
    assert spec.count_flops(config, feeds) == flops, (spec.name, shapes)
    return flops


def sizes_to_check(spec, config) -> list[dict[str, int]]:
    """The export example's sizes and the profile's smallest (no kept, recent or other tokens included)."""
    empty_ok = ("kept_len", "recent_len", "others_len")
    smallest = {a: lo if a in empty_ok else max(lo, 1) for a, (lo, _, _) in spec.profile(config).items()}
    return [{}, smallest]


# -- FLOP formulas -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["d2c-tiny", "d2c-tiny-cross_attn", "d2c-tiny-none"])
def test_stage_flops_equal_torch_flop_counter(name):
    config = get_config(name)
    model = random_model(config, 0)
    for spec in stages_for(config):
        for sizes in sizes_to_check(spec, config):
            feeds = spec.example_inputs(config, sizes)
            shapes = {k: tuple(v.shape) for k, v in feeds.items()}
            assert formula_count(config, spec, feeds) == torch_count(model, spec, feeds), (spec.name, shapes)


def test_flops_by_hand_on_the_tiny_preset():
    config = get_config("d2c-tiny")
    # diffusion head, C = 4 * 2 * 2 = 16 channels, width 32, depth 1, z width 32, per row:
    per_row = (2 * 16 * 32  # input_proj
               + 2 * 256 * 32 + 2 * 32 * 32  # timestep embedder (256 frequencies, then width x width)
               + 2 * 32 * 32  # cond_embed
               + 2 * 2 * 32 * 32 + 2 * 32 * 96  # one res block: MLP, AdaLN (shift, scale, gate)
               + 2 * 32 * 64 + 2 * 32 * 32)  # final AdaLN (shift, scale) and linear to 2C
    assert per_row == 37888
    assert diffusion_flops(config, 32) == 32 * per_row
    # gpt, dim 32, 2 layers, SwiGLU hidden 96, 17 cache slots + the new key, vocab 64, per row and token:
    per_layer = 2 * 32 * 96 + 2 * 32 * 32 + 3 * 2 * 32 * 96 + 2 * 2 * (17 + 1) * 32
    assert gpt_flops(config, rows=4, tokens=1) == 4 * (2 * per_layer + 2 * 32 * 64)
    assert STAGES["cond"].flops(config, {"discrete_ids": (2, 16)}) > 0
    assert STAGES["cond"].flops(get_config("d2c-tiny-cross_attn"), {"discrete_ids": (2, 16)}) == 0  # embedding only


def test_a_stage_cannot_be_declared_without_a_flop_formula():
    """The formula is a required part of a stage's spec: no default that would count a new stage as zero."""
    assert not any(f.name == "flops" and (f.default is not dataclasses.MISSING
                                          or f.default_factory is not dataclasses.MISSING)
                   for f in dataclasses.fields(StageSpec))
    vae = STAGES["vae"]
    rest = {f.name: getattr(vae, f.name) for f in dataclasses.fields(StageSpec) if f.name != "flops"}
    with pytest.raises(TypeError, match="flops"):
        StageSpec(**{**rest, "name": "upscaler"})
    assert "upscaler" not in STAGES
    with pytest.raises(ValueError, match="unknown stage"):
        stages_for(get_config("d2c-tiny"), ["upscaler"])


# -- measuring pieces ----------------------------------------------------------------------------------
def test_peak_memory_sees_a_large_allocation():
    # in a fresh process: memory that earlier tests' threads and allocators give back during the block would
    # lower the resident size below its base
    code = ("import numpy as np; from d2c_export.bench.run import peak_memory\n"
            "with peak_memory('cpu') as mem:\n"
            "    block = np.ones(64 << 20, dtype=np.uint8)  # 64 MiB, touched\n"
            "    del block\n"
            "print(mem['peak_rss_mb'] - mem['base_rss_mb'])")
    grown = float(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                                 cwd=Path(__file__).resolve().parents[3]).stdout.split()[-1])
    assert grown >= 48


def test_matmul_roofline_is_measured_for_torch_and_ort():
    roofline = matmul_roofline("cpu", torch.get_num_threads(), with_ort=True, size=256, runs=2)
    assert set(roofline) == {"torch", "ort", "peak"}
    assert all(math.isfinite(v) and v > 0 for v in roofline.values())
    assert roofline["peak"] == max(roofline["torch"], roofline["ort"])


# -- the command and its report ------------------------------------------------------------------------
def assert_complete(out: Path, backends: list[str], batches: list[int], config: str) -> dict:
    """Every requested backend x batch with every stage, numbers finite and positive, all files written."""
    for name in REPORT_FILES:
        assert (out / name).is_file(), name
    assert (out / "bench.png").read_bytes()[:8] == PNG_MAGIC
    summary = json.loads((out / "bench.json").read_text())
    stages = [s.name for s in stages_for(get_config(config)) if not s.optional]  # the exact sampler's
    cells = {(c["backend"], c["batch"]): c for c in summary["results"]}
    assert set(cells) == {(b, n) for b in backends for n in batches}
    for (backend, batch), c in cells.items():
        assert set(c["stages"]) == set(stages)
        numbers = [c["end_to_end_s"][k] for k in ("median", "p10", "p90")] + [
            c["images_per_s"], c["overhead_s"]["median"], c["flops_per_image"], c["achieved_flops"], c["peak_rss_mb"]]
        for st in c["stages"].values():
            numbers += [st["per_call_ms"]["median"], st["seconds_per_generation"], st["flops_per_call"],
                        st["achieved_flops"], st["roofline_fraction"], st["calls_per_generation"]]
        assert all(math.isfinite(x) and x > 0 for x in numbers), (backend, batch)
        assert c["end_to_end_s"]["p10"] <= c["end_to_end_s"]["median"] <= c["end_to_end_s"]["p90"]
        assert 0 < c["overhead_fraction"] < 1
        assert len(c["raw"]["wall_s"]) == summary["repeat"]
        if "torch" in backends:
            assert math.isfinite(c["speedup_vs_torch"]) and c["speedup_vs_torch"] > 0
    table = (out / "bench.md").read_text()
    for backend, batch in cells:
        for stage in stages:
            assert f"| {batch} | {backend} | {STAGES[stage].label} |" in table
    return summary


def test_bench_report_is_complete(engines_factory, tmp_path, capsys):
    engines = engines_factory("d2c-tiny")
    out = tmp_path / "report"
    code = bench_main(["--engines", str(engines), "--backends", "torch,ort", "--batch", "1,2", "--out", str(out),
                       *TINY_ARGS])
    assert code == 0, capsys.readouterr().err
    summary = assert_complete(out, ["torch", "ort"], [1, 2], "d2c-tiny")
    assert summary["sampling"]["num_iter"] == 2 and summary["sampling"]["diffusion_steps"] == 3
    calls = {c["backend"]: c["stages"]["diffusion"]["calls_per_generation"] for c in summary["results"]}
    assert calls == {"torch": 2 * 3, "ort": 2 * 3}
    assert "| 1 | ort |" in capsys.readouterr().out


def test_bench_from_config_exports_then_cleans_up(tmp_path, capsys):
    out = tmp_path / "report"
    code = bench_main(["--config", "d2c-tiny-none", "--backends", "ort,torch", "--batch", "1", "--out", str(out),
                       *TINY_ARGS])
    assert code == 0, capsys.readouterr().err
    assert_complete(out, ["ort", "torch"], [1], "d2c-tiny-none")
    assert sorted(p.name for p in out.iterdir()) == sorted(REPORT_FILES), "temporary engines removed"


def test_requested_trt_without_tensorrt_is_one_clear_error(engines_factory, tmp_path, capsys, without_tensorrt):
    out = tmp_path / "report"
    code = bench_main(["--engines", str(engines_factory("d2c-tiny")), "--backends", "torch,trt", "--out", str(out),
                       *TINY_ARGS])
    assert_one_line_error(code, capsys.readouterr().err, "backend trt", without_tensorrt)
    assert not out.exists()


def test_ort_fp16_without_fp16_graphs_is_one_clear_error(engines_factory, tmp_path, capsys):
    engines = engines_factory("d2c-tiny")
    opened = Engines.open(engines)
    assert opened.has("onnx-fp32") and not opened.has("onnx-fp16"), "the premise: FP32 graphs only"
    fix = opened.rebuild_command("onnx-fp16")
    assert "--fp16" in fix.split()
    before = files_in(engines)
    out = tmp_path / "report"
    code = bench_main(["--engines", str(engines), "--backends", "ort,ort-fp16", "--out", str(out), *TINY_ARGS])
    assert_one_line_error(code, capsys.readouterr().err, "onnx-fp16", "ort-fp16", f"`{fix}`")
    assert not out.exists()
    assert files_in(engines) == before, "the engines directory is left as it was"


@pytest.mark.parametrize("argv,needles", [
    (["--backends", "torch,tensorflow"], ["tensorflow", "torch, torch-fp16, torch-bf16, ort"]),
    (["--batch", "5"], ["max batch 4"]),
    (["--repeat", "0"], ["--repeat"]),
])
def test_bad_requests_are_one_clear_error(engines_factory, tmp_path, capsys, argv, needles):
    out = tmp_path / "report"
    code = bench_main(["--engines", str(engines_factory("d2c-tiny")), "--out", str(out), "--quiet", *argv])
    assert_one_line_error(code, capsys.readouterr().err, *needles)
    assert not out.exists()


def test_ort_fp16_column(demo_fp16_engines, tmp_path, capsys):
    # Trained weights (the session's demo export with FP16 graphs): random ones give latents beyond FP16's range,
    # which the runtime refuses.
    out = tmp_path / "report"
    code = bench_main(["--engines", str(demo_fp16_engines), "--backends", "torch,ort,ort-fp16", "--batch", "2",
                       "--out", str(out), *TINY_ARGS])
    assert code == 0, capsys.readouterr().err
    assert_complete(out, ["torch", "ort", "ort-fp16"], [2], Engines.open(demo_fp16_engines).config.name)


def d2c_b_widths():
    """d2c-b at its own widths, heads and shapes (256 tokens, kl16 VAE at 256 px) with two layers per stack."""
    from reference.model import D2CConfig
    b = get_config("d2c-b")
    mar = dataclasses.replace(b.mar, encoder_depth=2, decoder_depth=2, diffloss_d=2)
    return D2CConfig("d2c-b-widths", mar, b.vae, dataclasses.replace(b.gpt, n_layer=2))


@pytest.mark.slow
def test_stage_flops_at_d2c_b_widths_equal_torch_flop_counter():
    """d2c-b's FLOP formulas checked by torch's counter: every per-layer term at d2c-b's widths, and the depth
    multiplier at two layers (a formula that scales by depth needs no twelve layers to show it)."""
    config = d2c_b_widths()
    model = random_model(config, 0)
    for spec in stages_for(config):
        feeds = spec.example_inputs(config)
        assert formula_count(config, spec, feeds) == torch_count(model, spec, feeds), spec.name


@pytest.mark.slow
def test_bench_on_d2c_b(engines_factory, tmp_path, capsys):
    """The full-size architecture end to end: what only full size shows is that the bench measures and reports
    every stage of d2c-b's own exported graphs (the engines shared with the d2c-b generation test, which runs the
    torch backend on them too; a torch column here would add three d2c-b generations and show nothing more)."""
    out = tmp_path / "report"
    code = bench_main(["--engines", str(engines_factory("d2c-b")), "--backends", "ort", "--batch", "1",
                       "--num-iter", "2", "--diffusion-steps", "2", "--repeat", "1", "--out", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert_complete(out, ["ort"], [1], "d2c-b")


def test_gpu_memory_is_the_drivers_figure_next_to_torchs(monkeypatch):
    """On a GPU column both figures are recorded: the driver's used memory (TensorRT's and ONNX Runtime's too)."""
    from d2c_export.bench import run
    calls = []
    monkeypatch.setattr(run.torch.cuda, "reset_peak_memory_stats", lambda: calls.append("reset"))
    monkeypatch.setattr(run.torch.cuda, "max_memory_allocated", lambda: 100 * run.MB)
    monkeypatch.setattr(run.torch.cuda, "mem_get_info", lambda: (3000 * run.MB, 8000 * run.MB))
    with run.peak_memory("cuda") as mem:
        pass
    assert calls == ["reset"] and mem["peak_gpu_mb"] == 100 and mem["gpu_used_mb"] == 5000
    with run.peak_memory("cpu") as mem:
        pass
    assert mem["peak_gpu_mb"] is None and mem["gpu_used_mb"] is None


def test_bench_reports_tensorrt_memory(engines_factory, tmp_path, capsys, monkeypatch):
    """A TensorRT column (the real backend under the contract fakes) reports the device memory of its engines, their
    execution contexts, its CUDA graphs and its other buffers."""
    import dataclasses
    import shutil

    from d2c_export.backends import registry
    from d2c_export.backends.trt import TrtBackend
    from tests.d2c_export.backends.fake_cuda import FakeCudaDevice
    from tests.d2c_export.backends.fake_tensorrt import FakeTensorRT
    from tests.d2c_export.backends.trt_fakes import plans
    engines = tmp_path / "engines"
    shutil.copytree(engines_factory("d2c-tiny"), engines)
    device = FakeCudaDevice()
    trt = FakeTensorRT(device)
    plans(engines, (device, trt))
    on_fakes = dataclasses.replace(registry.BACKENDS["trt"], missing=lambda: None,
                                   open=lambda opened, precision, options: TrtBackend(opened, precision, trt=trt,
                                                                                      device=device))
    monkeypatch.setitem(registry.BACKENDS, "trt", on_fakes)
    out = tmp_path / "report"
    code = bench_main(["--engines", str(engines), "--backends", "torch,trt", "--batch", "1", "--out", str(out),
                       *TINY_ARGS])
    assert code == 0, capsys.readouterr().err
    summary = assert_complete(out, ["torch", "trt"], [1], "d2c-tiny")
    memory = summary["device_memory_mb"]
    assert set(memory) == {"trt"}
    assert set(memory["trt"]) == {"engines", "contexts", "graphs", "buffers"}
    assert all(v > 0 for v in memory["trt"].values())
    assert "device memory of `trt`: engines" in (out / "bench.md").read_text()


# -- samplers compared in one run ----------------------------------------------------------------------
def test_bench_compares_named_sampler_sets_with_their_stage_calls(engines_factory, tmp_path, capsys):
    from reference.pipeline import SamplingParams
    from reference.samplers import full_mar_steps
    out = tmp_path / "report"
    code = bench_main(["--engines", str(engines_factory("d2c-tiny")), "--backends", "ort,torch", "--batch", "1",
                       "--samplers", "exact,anneal,lazy,fast", "--num-iter", "8", "--diffusion-steps", "16",
                       "--cfg", "3.0", "--repeat", "1", "--out", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((out / "bench.json").read_text())
    cells = {(c["backend"], c["sampler"]): c for c in summary["results"]}
    assert set(cells) == {(b, s) for b in ("ort", "torch") for s in ("exact", "anneal", "lazy", "fast")}
    counts = SamplingParams(cfg=3.0, num_iter=8, diffusion_steps=16, sampler="fast").denoising_counts()
    assert counts[0] == 8 and counts[-1] == 5  # from half the steps to the floor
    annealed = sum(counts)
    lazy_steps = full_mar_steps(8, 9, 5).count(False)
    assert lazy_steps == 2
    for (backend, sampler), c in cells.items():
        calls = {name: st["calls_per_generation"] for name, st in c["stages"].items()}
        assert calls["diffusion"] == (annealed if sampler in ("anneal", "fast") else 8 * 16), (backend, sampler)
        mar_stages = ("mar_cached", "mar_fresh") if sampler in ("lazy", "fast") else ("mar",)  # the token cache
        assert all(calls[s] == 8 for s in mar_stages) and calls["vae"] == 1 and len(calls) == 4 + len(mar_stages)
        assert c["sampling"] == summary["samplers"][sampler]
        assert math.isfinite(c["speedup_vs_exact"]) and c["speedup_vs_exact"] > 0
        assert math.isfinite(c["speedup_vs_torch"])
    assert cells["ort", "exact"]["speedup_vs_exact"] == 1.0
    assert summary["samplers"]["fast"]["diffusion_anneal"] == "linear" and summary["samplers"]["fast"]["lazy_mar"] == 9
    assert summary["samplers"]["exact"]["diffusion_anneal"] == "off" and summary["samplers"]["exact"]["lazy_mar"] == 0
    flops = summary["flops_per_generation"]
    assert set(flops) == {f"1 {s}" for s in ("exact", "anneal", "lazy", "fast")}
    assert "mar" not in flops["1 lazy"] and flops["1 lazy"]["mar_cached"] > 0 and flops["1 lazy"]["mar_fresh"] > 0
    assert flops["1 lazy"]["diffusion"] == flops["1 exact"]["diffusion"]
    assert flops["1 anneal"]["diffusion"] < flops["1 exact"]["diffusion"] and flops["1 anneal"]["mar"] == flops["1 exact"]["mar"]
    table = (out / "bench.md").read_text()
    assert f"| 1 | ort fast | diffusion step | {annealed} |" in table and "| vs exact |" in table
    assert "- sampler `fast`: sampler fast, diffusion_anneal linear" in table


@pytest.mark.parametrize("argv,needles", [
    (["--samplers", "exact,turbo"], ["--samplers", "exact, anneal, lazy, fast"]),
    (["--samplers", "exact,fast", "--diffusion-steps", "3"], ["--diffusion-floor: 5 is above the 3", "lower it"]),
])
def test_sampler_sets_that_cannot_run_are_one_clear_error(engines_factory, tmp_path, capsys, argv, needles):
    out = tmp_path / "report"
    code = bench_main(["--engines", str(engines_factory("d2c-tiny")), "--out", str(out), "--quiet", *argv])
    assert_one_line_error(code, capsys.readouterr().err, *needles)
    assert not out.exists()


def test_samplers_the_engines_cannot_run_are_one_clear_error(tiny_engines_copy, tmp_path, capsys):
    from tests.d2c_export.test_generate import without_token_cache
    engines = without_token_cache(tiny_engines_copy)
    out = tmp_path / "report"
    code = bench_main(["--engines", str(engines), "--backends", "ort", "--samplers", "exact,lazy", "--out", str(out),
                       "--quiet"])
    assert_one_line_error(code, capsys.readouterr().err, "mar_cached", "d2c-export onnx")
    assert not out.exists()
