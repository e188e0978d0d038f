"""Device memory of the TensorRT backend under the contract fakes (`fake_tensorrt`, `fake_cuda`): execution contexts
share one scratch allocation per engine, a serving mix of batch sizes stays within a memory bound and captures a
bounded number of graphs, `close` gives every byte back, and the memory API of TensorRT 10.x and 11.x is used
without deprecated calls, through one logger.

The bound a backend must stay within: each plan's weights, activation memory of one context per engine (the
profile's upper bound, `device_memory_size_v2`), the captured graphs' buffers (`graph_memory_bytes`), one KV cache
for the most rows a generation has (guided max batch), and the other stages' tensors at their profile's largest
shapes.
"""
from __future__ import annotations

import gc
import random
import shutil
import warnings

import numpy as np
import pytest
import torch

from d2c_export.backends.ort import OrtBackend
from d2c_export.generate import generate_images
from d2c_export.stages import STAGES
from d2c_export.backends import Precision
from reference.gpt import cache_feeds
from reference.pipeline import SamplingParams
from reference.sampling import step_positions
from tests.d2c_export.backends.fake_cuda import ALIGNMENT, FakeCudaDevice
from tests.d2c_export.backends.fake_tensorrt import API_10, API_11, FakeTensorRT
from tests.d2c_export.backends.trt_fakes import backend, d2c_b_shaped, loop_feeds, on_device, plans
from tests.d2c_export.conftest import build_engines as export_engines

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PARAMS = SamplingParams(cfg=3.0, num_iter=4, diffusion_steps=5)
DEMO_PARAMS = SamplingParams(cfg=1.0, num_iter=4, diffusion_steps=25)


def _nbytes(shape, dtype: torch.dtype) -> int:
    return int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=dtype).element_size()


def activation_bound(trt) -> int:
    """One context's activation memory per engine at the profile's upper bound: one scratch per engine."""
    return sum(e.engine.device_memory_size_v2 for e in trt.engines.values())


def memory_bound(trt, trt_module, max_batch: int) -> int:
    """What the backend may hold on the fake device (see the module docstring)."""
    weights = sum(e.engine.weight_bytes for e in trt.engines.values())
    g = trt.config.gpt
    layer = 2 * max_batch * g.n_head * g.max_seq_len * g.head_dim * 4
    cache = 2 * g.n_layer * (-(-layer // ALIGNMENT) * ALIGNMENT)
    others = 0
    for name, e in trt.engines.items():
        if not STAGES[name].cuda_graph:
            plan = e.engine
            largest = {n: plan.profile[n][2] if n in plan.profile else plan.get_tensor_shape(n) for n in plan.inputs()}
            others += sum(_nbytes(s, plan.io[n][1]) for n, s in plan.shapes_for(largest).items())
    slack = 4 * ALIGNMENT * len(trt.engines)  # a small aligned allocation or two per engine (zero-element tensors)
    return weights + trt_module.activation_bytes() + trt.graph_memory_bytes() + cache + others + slack


def exercise(trt, device, config, max_batch: int) -> None:
    """Many shapes of every stage: gpt steps at every row count (captured), denoising loops at many row counts, the
    other stages at their parity shapes."""
    gpt = STAGES["gpt"]
    for rows in range(1, 2 * max_batch + 1):
        k, v = trt.gpt_cache(rows)
        for step in range(3):
            example = gpt.example_inputs(config, {"rows": rows, "tokens": 1}, seed=step, max_batch=max_batch)
            trt.run("gpt", {"ids": example["ids"], "input_pos": example["input_pos"], **cache_feeds(k, v)})
    for rows in range(1, 25):
        trt.denoise(on_device(device, loop_feeds(config, rows, 2, seed=rows)))
    for name in ("cond", "mar", "vae"):
        spec = STAGES[name]
        for sizes in spec.parity_cases(config, max_batch):
            trt.run(name, spec.example_inputs(config, sizes, max_batch=max_batch))


def test_execution_contexts_share_one_scratch_per_engine(tiny, fake):
    """3: dozens of captured keys and loops, and still one context's activation memory per engine."""
    device, trt_module = fake
    gc.collect()
    start = device.memory_used()
    with backend(tiny, fake) as trt:
        exercise(trt, device, tiny.config, tiny.max_batch)
        contexts = sum(e.engine.contexts for e in trt.engines.values())
        held = trt_module.activation_bytes()
        print(f"{contexts} contexts; activation memory {held} bytes, bound {activation_bound(trt)}")
        assert contexts > 2 * len(trt.engines)  # the premise: many contexts per graph engine
        assert held <= activation_bound(trt)
        gc.collect()
        assert device.memory_used() - start <= memory_bound(trt, trt_module, tiny.max_batch)


def test_the_reported_memory_is_what_the_device_holds(tiny, fake):
    """`device_memory` (what d2c-bench reports) accounts for every byte the backend holds on the device."""
    device, _ = fake
    gc.collect()
    start = device.memory_used()
    with backend(tiny, fake) as trt:
        exercise(trt, device, tiny.config, tiny.max_batch)
        gc.collect()
        report = trt.device_memory()
        assert set(report) == {"engines", "contexts", "graphs", "buffers"} and all(v > 0 for v in report.values())
        assert sum(report.values()) == device.memory_used() - start
        assert report["graphs"] == trt.graph_memory_bytes()


def test_close_gives_back_all_device_memory(tiny, fake):
    """Opening, using and closing the backend again and again leaves the device as it was, even while the closed
    backends are still referenced; a closed backend refuses work."""
    device, _ = fake
    gc.collect()
    start = device.memory_used()
    closed = []
    for round_ in range(4):
        trt = backend(tiny, fake)
        generate_images(trt, [1, 7, 3][:round_ % 3 + 1], PARAMS, seed=round_)
        assert device.memory_used() > start
        trt.close()
        closed.append(trt)
        gc.collect()
        assert device.memory_used() == start, round_
    with pytest.raises(RuntimeError, match="closed"):
        generate_images(closed[0], [1], PARAMS, seed=0)


@pytest.mark.parametrize("version", [API_10, API_11])
def test_the_memory_api_of_tensorrt_10_and_11(engines_factory, tmp_path, version):
    """7a: TensorRT 10.x warns on the deprecated memory calls, 11.x has none of them: neither is used, and a
    generation equals ONNX Runtime's on both."""
    device = FakeCudaDevice()
    fake = (device, FakeTensorRT(device, version))
    shutil.copytree(engines_factory("d2c-tiny"), tmp_path / "engines")
    engines = plans(tmp_path / "engines", fake)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trt = backend(engines, fake)
        got, _ = generate_images(trt, [1, 7], PARAMS, seed=3)
        memory = trt.graph_memory_bytes()
    deprecated = [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)
                  and str(w.message).startswith(("ICudaEngine.", "IExecutionContext."))]
    assert deprecated == []
    assert memory > 0 and trt.device_memory()["contexts"] > 0
    trt.close()
    with OrtBackend(engines, Precision.FP32, threads=1) as ort:
        want, _ = generate_images(ort, [1, 7], PARAMS, seed=3)
    assert torch.equal(got.discrete_ids, want.discrete_ids)
    assert float((got.images - want.images).abs().max()) < 1e-4


def test_one_logger_for_every_tensorrt_object(tiny, fake):
    """7b: the builder, its parsers and every backend's runtime get the same logger (TensorRT warns otherwise)."""
    _, trt_module = fake
    with backend(tiny, fake), backend(tiny, fake):
        pass
    assert len(trt_module.loggers) == 1 and trt_module.logger_warnings == 0


def test_fp16_plans_keep_the_kv_cache_in_fp16(demo_engines, tmp_path, fake):
    """7d: an FP16 plan reads its cache layers as FP16, so the cache is kept in FP16 (no cast of every layer on
    every decode step), and a generation equals the FP16 graphs' on ONNX Runtime (the trained demo: random
    weights overflow FP16)."""
    shutil.copytree(demo_engines.directory, tmp_path / "engines")
    engines = plans(tmp_path / "engines", fake, Precision.FP16)
    with backend(engines, fake, Precision.FP16) as trt:
        gpt = trt.engines["gpt"]
        layers = [n for n in gpt.inputs if "_cache_" in n]
        assert layers and {gpt.dtypes[n] for n in layers} == {torch.float16}
        k, v = trt.gpt_cache(2)
        assert k.dtype == v.dtype == torch.float16
        got, _ = generate_images(trt, [1, 7], DEMO_PARAMS, seed=3)
    with OrtBackend(engines, Precision.FP16, threads=0, keep_fp16_rounding=True) as ort:
        want, _ = generate_images(ort, [1, 7], DEMO_PARAMS, seed=3)
    assert torch.equal(got.discrete_ids, want.discrete_ids)
    # ONNX Runtime's CPU provider computes FP16 nodes in FP32 between casts it inserts and merges, so inputs handed
    # to it already in FP16 (as TensorRT reads them) move some pixels by a few 1e-3 (4.5e-3 seen)
    assert float((got.images - want.images).abs().max()) < 2e-2


# -- a serving mix on a d2c-b-shaped model ----------------------------------------------------------------------
def predicted_rows(config, params: SamplingParams, max_batch: int) -> set[int]:
    """Every row count a masked step denoises at batch sizes 1..max_batch."""
    seq_len = config.mar.seq_len
    steps = step_positions(torch.arange(seq_len)[None], seq_len, params.num_iter)
    return {b * pred.shape[1] for b in range(1, max_batch + 1) for _, pred in steps}


@pytest.mark.slow
def test_a_serving_mix_stays_bounded_in_memory_and_captures(tmp_path, fake, monkeypatch):
    """3 and 4: batch sizes 1..16 in a shuffled order, three rounds, on a d2c-b-shaped model (256 discrete tokens,
    256 latent tokens, max batch 16; fewer masked and denoising steps than ImageNet's and a two-level VAE, 32 px
    images, to run on two CPU cores: the 256 px decoder was most of the time and no part of what is checked here):
    every generation equals ONNX Runtime's, the device stays within the bound throughout, and the captures stop:
    fewer in all than the shapes the mix runs, none in the third round. (The KV cache and the scratch grow a few
    times in the first round; a key captured before the last growth is captured again when it next runs, so the
    second round may still capture a few.)"""
    device, trt_module = fake
    config, presets = d2c_b_shaped(vae_levels=2)
    monkeypatch.setitem(presets, config.name, config)
    max_batch = 16
    engines = plans(export_engines(config.name, tmp_path / "engines", max_batch=max_batch), fake)
    params = SamplingParams(cfg=4.0, num_iter=4, diffusion_steps=2)
    order = list(range(1, max_batch + 1))
    random.Random(0).shuffle(order)
    want, captures, peak = {}, [], 0
    gc.collect()
    start = device.memory_used()
    with OrtBackend(engines, Precision.FP32, threads=1) as ort, backend(engines, fake) as trt:
        for round_ in range(3):
            before = device.captures
            for batch in order:
                labels = [(3 * i + batch) % 10 for i in range(batch)]
                got, _ = generate_images(trt, labels, params, seed=batch)
                if batch not in want:
                    want[batch] = generate_images(ort, labels, params, seed=batch)[0]
                assert torch.equal(got.discrete_ids, want[batch].discrete_ids), (round_, batch)
                assert float((got.images - want[batch].images).abs().max()) < 1e-4, (round_, batch)
                assert trt_module.activation_bytes() <= activation_bound(trt), (round_, batch)
                used = device.memory_used() - start
                assert used <= memory_bound(trt, trt_module, max_batch), (round_, batch)
                peak = max(peak, used)
            captures.append(device.captures - before)
        report = trt.device_memory()
    keys = len(predicted_rows(config, params, max_batch)) + max_batch  # loops by exact row count, gpt row counts
    print(f"captures per round {captures}, at most {keys} keys; peak {peak / 2**20:.1f} MiB; "
          f"report {({k: round(v / 2**20, 2) for k, v in report.items()})} MiB")
    assert captures[2] == 0 and sum(captures) <= keys
