"""The TensorRT backend's real code, run end to end on the CPU under the contract fake (`fake_tensorrt`).

Plans are built by the real `build_engines` through the fake builder; `TrtBackend` binds, enqueues,
captures and replays through the fake, which enforces TensorRT's and CUDA's documented rules and
computes each engine with ONNX Runtime on the bound memory.
"""
from __future__ import annotations

import shutil

import pytest
import torch

from d2c_export.backends.ort import OrtBackend
from d2c_export.backends.trt import TrtBackend
from d2c_export.engines import Engines
from d2c_export.errors import EngineError
from d2c_export.export.trt_build import build_engines
from d2c_export.generate import generate_images
from d2c_export.stages import STAGES
from d2c_export.backends import Precision
from reference.gpt import cache_feeds
from reference.model import get_config
from reference.pipeline import SamplingParams
from tests.d2c_export.backends.fake_cuda import FakeCudaDevice
from tests.d2c_export.backends.fake_tensorrt import FakeTensorRT
from tests.d2c_export.conftest import build_engines as export_engines

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture()
def fake():
    device = FakeCudaDevice()
    return device, FakeTensorRT(device)


def plans(directory, fake, precision: Precision = Precision.FP32) -> Engines:
    """The FP32 (or FP16) plans of the engines in `directory`, built by the real builder code on the fake."""
    device, trt = fake
    build_engines(Engines.open(directory), fp16=precision is Precision.FP16, progress=False, trt=trt, device=device)
    return Engines.open(directory)


@pytest.fixture()
def tiny(engines_factory, tmp_path, fake):
    shutil.copytree(engines_factory("d2c-tiny"), tmp_path / "engines")
    return plans(tmp_path / "engines", fake)


def backend(engines: Engines, fake, precision: Precision = Precision.FP32) -> TrtBackend:
    device, trt = fake
    return TrtBackend(engines, precision, trt=trt, device=device)


def replays(fake) -> int:
    """Graph replays as the fake device counted them."""
    return fake[0].replays


def assert_same(got: tuple, want: tuple, what) -> None:
    assert len(got) == len(want), what
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype, what
        torch.testing.assert_close(g, w, rtol=0, atol=1e-6, msg=lambda m: f"{what}: {m}")


# -- whole generations -------------------------------------------------------------------------------------
def d2c_b_shaped():
    """d2c-b's structure (256 discrete tokens, 16x16 latent grid of 16 channels, Q-Former, 256 px) at tiny widths."""
    from reference.gpt import GPTArgs
    from reference.model import D2CConfig, PRESETS
    from reference.vae import VAEArgs
    b = get_config("d2c-b")
    vae = VAEArgs(embed_dim=16, ch=32, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=1, resolution=256, attn_resolutions=())
    mar = b.mar.__class__(**{**vars(b.mar), "encoder_embed_dim": 32, "encoder_depth": 1, "encoder_num_heads": 2,
                              "decoder_embed_dim": 32, "decoder_depth": 1, "decoder_num_heads": 2, "diffloss_d": 1,
                              "diffloss_w": 32, "qformer_depth": 1, "qformer_num_heads": 2, "class_num": 10})
    gpt = GPTArgs(dim=32, n_layer=2, n_head=2, vocab_size=b.gpt.vocab_size, block_size=256, num_classes=10)
    config = D2CConfig("d2c-b-shaped", mar, vae, gpt)
    return config, PRESETS


@pytest.mark.parametrize("shape", ["d2c-tiny", "d2c-b-shaped"])
def test_a_whole_generation_equals_onnx_runtime(shape, engines_factory, tmp_path, fake, monkeypatch):
    if shape == "d2c-tiny":
        shutil.copytree(engines_factory("d2c-tiny"), tmp_path / "engines")
        labels, params = [1, 7, 3], SamplingParams(cfg=3.0, num_iter=4, diffusion_steps=20)
    else:
        config, presets = d2c_b_shaped()
        monkeypatch.setitem(presets, config.name, config)
        export_engines(config.name, tmp_path / "engines", max_batch=2)
        labels, params = [4, 2], SamplingParams(cfg=4.0, num_iter=4, diffusion_steps=6)
    engines = plans(tmp_path / "engines", fake)
    with OrtBackend(engines, Precision.FP32, threads=1) as ort:
        want = [generate_images(ort, labels, params, seed=seed)[0] for seed in (3, 4)]
    with backend(engines, fake) as trt:
        got, timer = generate_images(trt, labels, params, seed=3)
        again, _ = generate_images(trt, labels, params, seed=4)  # replays what the first generation captured
        counts = trt.graph_replays()
    print(f"{shape}: graph replays per stage {counts}")
    for g, w in zip((got, again), want):
        assert torch.equal(g.discrete_ids, w.discrete_ids)
        assert float((g.images - w.images).abs().max()) < 1e-4
    # every masked step replays its whole denoising loop as one graph (a new shape is captured first), and from
    # its second call on, a gpt decode step replays its captured graph
    assert counts["denoise"] == 2 * params.num_iter and counts["diffusion"] == 0
    assert timer.calls["diffusion"] == params.num_iter * params.diffusion_steps
    assert counts["gpt"] >= timer.calls["gpt"] - 1 and counts["mar"] == counts["vae"] == 0
    assert sum(counts.values()) == replays(fake)


# -- every stage at several shapes, with returns ------------------------------------------------------------
def _cases(spec, config, max_batch: int) -> list[dict]:
    opt, smallest, odd = spec.parity_cases(config, max_batch)
    return [opt, smallest, odd, opt, odd, smallest, opt]


@pytest.mark.parametrize("stage", list(STAGES))
def test_every_stage_at_three_shapes_and_back(tiny, fake, stage):
    spec, config = STAGES[stage], tiny.config
    with OrtBackend(tiny, Precision.FP32, threads=1) as ort, backend(tiny, fake) as trt:
        for i, sizes in enumerate(_cases(spec, config, tiny.max_batch)):
            for repeat in range(3):  # the first call of a shape runs, the second captures, the third replays
                feeds = spec.example_inputs(config, sizes, seed=10 * i + repeat, max_batch=tiny.max_batch)
                assert_same(trt.run(stage, feeds), ort.run(stage, feeds), (stage, sizes, repeat))
        counts = trt.graph_replays()
    if spec.cuda_graph:
        assert counts[stage] > 0, counts
    else:
        assert counts[stage] == 0, counts


# -- the reviewed defects, one test each ---------------------------------------------------------------
def test_empty_inputs_get_an_address(tiny, fake):
    """1: the mar step's `kept` is (rows, 0) on the first masked step; TensorRT needs a non-null address."""
    spec = STAGES["mar"]
    feeds = spec.example_inputs(tiny.config, {"kept_len": 0, "pred_len": 16, "rows": 2}, max_batch=tiny.max_batch)
    assert feeds["kept"].numel() == 0
    with OrtBackend(tiny, Precision.FP32, threads=1) as ort, backend(tiny, fake) as trt:
        assert_same(trt.run("mar", feeds), ort.run("mar", feeds), "kept_len 0")


def test_graphs_are_never_replayed_against_another_shape(tiny, fake):
    """2: shape A captured, shape B run, then A again: A's graph must not replay over B's context state."""
    spec, config = STAGES["diffusion"], tiny.config
    a, b = {"n": 16, "m": 32}, {"n": 8, "m": 16}
    with OrtBackend(tiny, Precision.FP32, threads=1) as ort, backend(tiny, fake) as trt:
        for k, sizes in enumerate([a] * 3 + [b] * 3 + [a] * 3 + [b] * 2):
            feeds = spec.example_inputs(config, sizes, seed=k, max_batch=tiny.max_batch)
            assert_same(trt.run("diffusion", feeds), ort.run("diffusion", feeds), (k, sizes))
        assert replays(fake) >= 4


def test_replayed_calls_read_their_new_inputs(tiny, fake):
    """3: a replayed graph computes from the inputs copied in for that call, not the captured call's."""
    spec, config = STAGES["diffusion"], tiny.config
    with OrtBackend(tiny, Precision.FP32, threads=1) as ort, backend(tiny, fake) as trt:
        outs = []
        for k in range(6):
            feeds = spec.example_inputs(config, {"n": 16, "m": 32}, seed=100 + k, max_batch=tiny.max_batch)
            got = trt.run("diffusion", feeds)
            assert_same(got, ort.run("diffusion", feeds), k)
            outs.append(got[0])
        assert replays(fake) >= 4
    assert not torch.equal(outs[-1], outs[-2])


def test_cache_layers_are_aligned_for_every_row_count(tiny, fake):
    """4: layer views of one stacked cache must each start on a 256-byte boundary, odd row counts included
    (d2c-tiny's layers are 2176 bytes per row: 128 bytes off for odd rows in a plain stacked cache)."""
    spec, config = STAGES["gpt"], tiny.config
    with OrtBackend(tiny, Precision.FP32, threads=1) as ort, backend(tiny, fake) as trt:
        for rows in (1, 3, 2):
            k, v = trt.gpt_cache(rows)
            example = spec.example_inputs(config, {"rows": rows, "tokens": 1}, seed=rows, max_batch=tiny.max_batch)
            stacked = [torch.stack([example[f"{kv}_cache_{i}"] for i in range(config.gpt.n_layer)]) for kv in "kv"]
            k.copy_(stacked[0])
            v.copy_(stacked[1])
            feeds = {"ids": example["ids"], "input_pos": example["input_pos"], **cache_feeds(k, v)}
            host = {"ids": example["ids"], "input_pos": example["input_pos"], **cache_feeds(*stacked)}
            assert_same(trt.run("gpt", feeds), ort.run("gpt", host), rows)


def test_a_refused_shape_leaves_the_engine_usable(tiny, fake):
    """7: a shape outside the profile is refused in one line, and the shape before it still runs right."""
    spec, config = STAGES["mar"], tiny.config
    good = {"rows": 2, "kept_len": 4, "pred_len": 4}
    seq_len = config.mar.seq_len
    with OrtBackend(tiny, Precision.FP32, threads=1) as ort, backend(tiny, fake) as trt:
        feeds = spec.example_inputs(config, good, max_batch=tiny.max_batch)
        assert_same(trt.run("mar", feeds), ort.run("mar", feeds), "before")
        bad = {"tokens": torch.zeros(4, seq_len, config.mar.token_dim), "kept": torch.arange(seq_len).expand(4, -1),
               "pred": torch.zeros(4, 0, dtype=torch.int64), "labels": torch.zeros(4, dtype=torch.int64),
               "fusion": feeds["fusion"].repeat(2, 1, 1)}
        with pytest.raises(EngineError, match="outside the built profile"):
            trt.run("mar", bad)
        feeds = spec.example_inputs(config, good, seed=1, max_batch=tiny.max_batch)
        assert_same(trt.run("mar", feeds), ort.run("mar", feeds), "after")


def test_a_failed_capture_stops_every_replay(tiny, fake):
    """8a: when a capture fails, no graph replays afterwards (not even one captured before), results stay right."""
    device, _ = fake
    spec, config = STAGES["diffusion"], tiny.config
    a, b = {"n": 16, "m": 32}, {"n": 8, "m": 16}
    with OrtBackend(tiny, Precision.FP32, threads=1) as ort, backend(tiny, fake) as trt:
        def call(sizes, k):
            feeds = spec.example_inputs(config, sizes, seed=k, max_batch=tiny.max_batch)
            assert_same(trt.run("diffusion", feeds), ort.run("diffusion", feeds), (sizes, k))

        for k in range(3):
            call(a, k)
        before = replays(fake)
        assert before >= 1
        call(b, 10)
        device.fail_capture = True  # the second call of b captures, and that capture fails
        call(b, 11)
        for k in range(3):
            call(a, 20 + k)
            call(b, 30 + k)
        assert replays(fake) == before


def test_an_enqueue_failure_during_capture_is_an_error(tiny, fake):
    """8b: execute_async_v3 returning False while capturing is a failure of the run, not a capture warning."""
    _, trt_module = fake
    spec, config = STAGES["diffusion"], tiny.config
    with backend(tiny, fake) as trt:
        feeds = spec.example_inputs(config, {"n": 16, "m": 32}, max_batch=tiny.max_batch)
        trt.run("diffusion", feeds)
        trt_module.fail_next_enqueue_in_capture()
        with pytest.raises(EngineError, match="failed to run"):
            trt.run("diffusion", feeds)


def test_the_graph_cache_is_bounded_and_reported(tiny, fake):
    from d2c_export.backends.trt_engine import GRAPH_CACHE
    spec, config = STAGES["diffusion"], tiny.config
    with backend(tiny, fake) as trt:
        for n in range(1, GRAPH_CACHE + 4):
            feeds = spec.example_inputs(config, {"n": n, "m": n}, max_batch=tiny.max_batch)
            for _ in range(2):
                trt.run("diffusion", feeds)
        engine = trt.engines["diffusion"]
        assert len(engine.graphs()) <= GRAPH_CACHE
        assert trt.graph_memory_bytes() > 0


# -- a masked step's denoising loop as one graph ------------------------------------------------------------
def loop_feeds(config, rows: int, steps: int, seed: int, groups: int = 2) -> dict:
    """The feeds of `Stages.denoise` for one masked step of `rows` latent rows, on the fake's device."""
    from reference.diffusion import make_tables, step_tables
    g = torch.Generator().manual_seed(seed)
    m = config.mar
    return {"noise": torch.randn(steps + 1, rows, m.token_dim, generator=g),
            "z": torch.randn(groups * rows, m.decoder_embed_dim, generator=g), **step_tables(make_tables(steps)),
            "cfg": torch.tensor([1.5 + seed % 3]), "temperature": torch.tensor([0.9])}


def on_device(device, feeds: dict) -> dict:
    out = {}
    for n, t in feeds.items():
        out[n] = device.empty(tuple(t.shape), t.dtype)
        out[n].copy_(t)
    return out


def test_a_denoising_loop_replays_as_one_graph_and_reads_its_new_feeds(tiny, fake):
    """One replay per masked step, computing from that step's noise, z, cfg and tables: what the steps give one
    `run` at a time on ONNX Runtime, and a different result for different feeds."""
    from reference.diffusion import denoise_steps
    device, _ = fake
    with OrtBackend(tiny, Precision.FP32, threads=1) as ort, backend(tiny, fake) as trt:
        assert trt.graphs_denoise
        outs = []
        for k, (rows, steps) in enumerate([(4, 5), (4, 5), (3, 5), (4, 5), (4, 7), (3, 5)]):
            feeds = loop_feeds(tiny.config, rows, steps, seed=k)
            got = trt.denoise(on_device(device, feeds))
            torch.testing.assert_close(got, denoise_steps(ort.run, feeds), rtol=1e-6, atol=1e-5, msg=lambda m: f"{k}: {m}")
            outs.append(got.clone())
        counts = trt.graph_replays()
        assert counts["denoise"] == 6 and counts["diffusion"] == 0 and replays(fake) == 6
        assert len(trt.loops.entries) == 3  # (4, 5), (3, 5), (4, 7)
        assert trt.graph_memory_bytes() > 0
    assert not torch.equal(outs[0], outs[1])


def test_a_failed_loop_capture_runs_the_steps_one_by_one(tiny, fake, caplog):
    """A loop that cannot be captured warns once; that masked step and every later one run per step, right,
    and nothing of the engine replays any more."""
    from reference.diffusion import denoise_steps
    device, _ = fake
    with OrtBackend(tiny, Precision.FP32, threads=1) as ort, backend(tiny, fake) as trt:
        device.fail_capture = True
        for k in range(3):
            feeds = loop_feeds(tiny.config, 4, 5, seed=k)
            torch.testing.assert_close(trt.denoise(on_device(device, feeds)), denoise_steps(ort.run, feeds),
                                       rtol=0, atol=1e-5)
        assert replays(fake) == 0 and not trt.loops.entries and not trt.engines["diffusion"].cuda_graphs
    assert sum("CUDA graph capture failed" in r.getMessage() for r in caplog.records) == 1


def test_an_enqueue_failure_while_capturing_a_loop_is_an_error(tiny, fake):
    device, trt_module = fake
    with backend(tiny, fake) as trt:
        trt_module.fail_next_enqueue_in_capture()
        with pytest.raises(EngineError, match="while capturing"):
            trt.denoise(on_device(device, loop_feeds(tiny.config, 4, 5, seed=0)))


def test_the_loop_cache_is_bounded(tiny, fake):
    from d2c_export.backends.trt_engine import LOOP_CACHE
    device, _ = fake
    with backend(tiny, fake) as trt:
        for rows in range(1, LOOP_CACHE + 3):
            trt.denoise(on_device(device, loop_feeds(tiny.config, rows, 2, seed=rows)))
        assert len(trt.loops.entries) == LOOP_CACHE
        first = trt.graph_memory_bytes()
        trt.denoise(on_device(device, loop_feeds(tiny.config, LOOP_CACHE + 3, 2, seed=0)))
        assert len(trt.loops.entries) == LOOP_CACHE and trt.graph_memory_bytes() > first  # a larger key replaced a small one


# -- the fake's capture rules, which the loop's capture relies on ---------------------------------------------
def test_the_fake_records_copies_on_the_capture_stream_and_refuses_others():
    from tests.d2c_export.backends.fake_cuda import ContractViolation
    device = FakeCudaDevice()
    stream, other = device.new_stream(), device.new_stream()
    src, dst = device.empty((4,), torch.float32), device.empty((4,), torch.float32)
    src.fill_(1.0)
    dst.zero_()
    graph = device.new_graph()
    with device.capture(graph, stream):
        device.copy(dst, src)
        assert float(dst.sum()) == 0.0  # recorded, not run
        with device.use(other):
            with pytest.raises(ContractViolation, match="another stream"):
                device.copy(dst, src)
        with pytest.raises(ContractViolation, match="host memory"):
            device.copy(dst, torch.ones(4))
    src.fill_(2.0)
    graph.replay()
    assert dst.tolist() == [2.0] * 4  # the replay copies what the source holds then
