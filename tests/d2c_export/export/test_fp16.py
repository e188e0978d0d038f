"""FP16 graphs on ONNX Runtime's CPU provider against the FP32 reference: ranges, parity, precision, images."""
from __future__ import annotations

import math
import shutil

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto

from d2c_export.backends.ort import CPU, OrtBackend, OrtSession
from d2c_export.cli import export_main, run_main
from d2c_export.engines import Engines
from d2c_export.export.fp16 import FP32_OPS, check_precision, convert_engines
from d2c_export.manifest import MANIFEST, Manifest
from d2c_export.export.onnx import export_model
from d2c_export.generate import generate_images
from d2c_export.sources import ModelRequest, build_model, random_model
from d2c_export.stages import STAGES, stages_for
from d2c_export.backends import Precision
from d2c_export.verify.parity import check_stage
from reference.checkpoint import save_checkpoint
from reference.diffusion import make_tables
from reference.gpt import cache_feeds
from reference.model import get_config
from reference.pipeline import SamplingParams
from tests.d2c_export.verify.test_parity import CASES

MIN_COSINE, MAX_REL_L2, MIN_ARGMAX = 0.999, 1e-2, 0.99
SEEDS = (0, 100)


def psnr(got: np.ndarray, ref: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of images in [-1, 1] (peak: the full range); inf when equal."""
    mse = float(np.mean((np.asarray(got, dtype=np.float64) - np.asarray(ref, dtype=np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(4.0 / mse)


@pytest.fixture(scope="session")
def fp16_factory(engines_factory, tmp_path_factory):
    """A private copy of a tiny preset's engines with the FP16 graphs added."""
    cache = {}

    def get(name: str):
        if name not in cache:
            dst = tmp_path_factory.mktemp(f"{name.replace('-', '_')}_fp16")
            shutil.copytree(engines_factory(name), dst, dirs_exist_ok=True)
            convert_engines(Engines.open(dst), progress=False)
            cache[name] = dst
        return cache[name]

    return get


def fp16_session(engines: Engines, stage: str) -> OrtSession:
    return OrtSession(engines.file(stage, "onnx-fp16"), [CPU], optimize=False)  # FP16 rounding kept


def fp16_backend(engines: Engines) -> OrtBackend:
    """Every stage's FP16 graph on ONNX Runtime's CPU provider, FP16 rounding kept (no graph optimisations)."""
    return OrtBackend(engines, Precision.FP16, keep_fp16_rounding=True, provider_list=[CPU])


def value_types(path) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    g = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in list(g.input) + list(g.output) + list(g.value_info)}
    types.update({t.name: t.data_type for t in g.initializer})
    return types


@pytest.mark.parametrize("stage,config", CASES, ids=[f"{s}-{c}" for s, c in CASES])
def test_fp16_matches_reference(fp16_factory, stage, config):
    engines = Engines.open(fp16_factory(config))
    model = engines.model()
    with fp16_backend(engines) as backend:
        reports = [r for seed in SEEDS
                   for r in check_stage(model, STAGES[stage], backend, engines.max_batch, seed=seed)]
    assert len(reports) == len(SEEDS) * len(STAGES[stage].parity_cases(model.config, engines.max_batch)) \
        * len(STAGES[stage].output_specs(model.config))
    assert {r.kind for r in reports} == {"onnx-fp16"}
    for r in reports:
        assert r.result.finite, (r.sizes, r.output)
        assert r.result.cosine >= MIN_COSINE and r.result.rel_l2 <= MAX_REL_L2, (r.sizes, r.output, r.result)


def test_gpt_argmax_agrees_under_teacher_forcing(fp16_factory):
    engines = Engines.open(fp16_factory("d2c-tiny"))
    model = engines.model()
    session, g = fp16_session(engines, "gpt"), model.config.gpt
    agree = total = 0
    for seed in SEEDS:
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, g.vocab_size, (4, g.max_seq_len), generator=gen)  # class token, then the image tokens
        ids[:, 0] = torch.randint(0, g.num_classes, (4,), generator=gen)
        pos = torch.arange(g.max_seq_len)
        k, v = model.gpt.empty_cache(4)
        with torch.no_grad():
            ref = model.gpt(ids, pos, k, v)[0].argmax(-1).numpy()
        caches = {name: c.numpy() for name, c in cache_feeds(k, v).items()}
        got = session.run({"ids": ids.numpy(), "input_pos": pos.numpy(), **caches})["logits"]
        assert np.isfinite(got).all()
        agree, total = agree + int((got.argmax(-1) == ref).sum()), total + ref.size
    assert agree / total >= MIN_ARGMAX, agree / total


def test_ddpm_arithmetic_stays_fp32_at_the_first_step(fp16_factory):
    """At the first respaced step sqrt(1/alpha_bar) is ~2e4: sqrt_recip * x overflows FP16 (65504) for |x| > 3."""
    engines = Engines.open(fp16_factory("d2c-tiny"))
    model = engines.model()
    tables = make_tables(100)
    first = tables.num_timesteps - 1
    assert tables.coefficients(first)[0] > 1e4
    feeds = STAGES["diffusion"].example_inputs(model.config, {"n": 8, "m": 16}, seed=3)
    feeds.update(x=feeds["x"] * 2.0, t=torch.tensor([tables.model_timestep(first)]), coefs=tables.coefficients(first))
    assert float(feeds["x"].abs().max()) * float(feeds["coefs"][0]) > 65504
    spec = STAGES["diffusion"]
    with torch.no_grad():
        ref = spec.wrapper(model)(*(feeds[t.name] for t in spec.input_specs(model.config)))
    got = fp16_session(engines, "diffusion").run({k: v.numpy() for k, v in feeds.items()})["x_prev"]
    assert np.isfinite(got).all()
    assert np.linalg.norm(got - ref.numpy()) / np.linalg.norm(ref.numpy()) <= MAX_REL_L2


FP32_COMPUTED = {"gpt": ("logits",), "diffusion": ("x_prev",)}  # outputs whose last op runs in FP32


@pytest.mark.parametrize("config", ["d2c-tiny", "d2c-tiny-none"])
def test_fp32_is_kept_where_fp16_breaks(fp16_factory, config):
    engines = Engines.open(fp16_factory(config))
    for spec in stages_for(engines.config):
        path = engines.file(spec.name, "onnx-fp16")
        graph = onnx.load(str(path))
        types = value_types(path)
        out_type = {n.name: types.get(n.output[0]) for n in graph.graph.node}
        for node in graph.graph.node:
            if node.op_type in FP32_OPS or node.op_type == "ReduceMean":  # norms, softmax, sin/cos/exp, RMSNorm
                assert out_type[node.name] == TensorProto.FLOAT, (spec.name, node.name, node.op_type)
        producer = {o: n for n in graph.graph.node for o in n.output}
        for t in spec.output_specs(engines.config):  # graph outputs keep their type ...
            assert types[t.name] == TensorProto.FLOAT
        # ... and the logits and the DDPM update are computed in FP32. (The gpt's k_new/v_new are the FP16 key and
        # value projections cast up: the attention reads them back in FP16, so FP32 there would add nothing.)
        for name in FP32_COMPUTED.get(spec.name, ()):
            node = producer[name]
            assert node.op_type != "Cast" and all(types.get(i) != TensorProto.FLOAT16 for i in node.input), name
        for node in graph.graph.node:  # the attention scores feeding each softmax come from FP32 MatMuls only
            if node.op_type == "Softmax":
                matmuls, stack = [], [producer[node.input[0]]]
                while stack:
                    src = stack.pop()
                    if src.op_type == "MatMul":
                        matmuls.append(src)
                        continue
                    stack += [producer[i] for i in src.input if types.get(i) == TensorProto.FLOAT and i in producer]
                assert matmuls, (spec.name, node.name)
                for mm in matmuls:
                    assert all(types[i] == TensorProto.FLOAT for i in mm.input), (spec.name, mm.name)
        weights = [t for t in graph.graph.initializer if t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16)]
        half = sum(math.prod(t.dims) for t in weights if t.data_type == TensorProto.FLOAT16)
        assert half > 0.5 * sum(math.prod(t.dims) for t in weights), spec.name  # weights mostly FP16
        # ... and so is the arithmetic: a FP32 region spreading through the network (as a pass-through rule from the
        # gpt's cache inputs to its outputs once did, every layer depending on the one before) fails here
        linear = [n for n in graph.graph.node if n.op_type in ("MatMul", "Gemm", "Conv")]
        half_ops = [n for n in linear if out_type[n.name] == TensorProto.FLOAT16]
        assert len(half_ops) > 0.5 * len(linear), (spec.name, len(half_ops), len(linear))


def test_fp16_entries_and_io(fp16_factory):
    engines = Engines.open(fp16_factory("d2c-tiny"))
    for spec in stages_for(engines.config):
        fp32, fp16 = engines.manifest.stages[spec.name]["onnx-fp32"], engines.entry(spec.name, "onnx-fp16")
        assert fp16.precision == "fp16" and fp16.main_file == f"{spec.name}.fp16.onnx"
        assert (fp16.inputs, fp16.outputs, fp16.profile) == (fp32.inputs, fp32.outputs, fp32.profile)
        check_precision(engines.directory / fp16.main_file, set())  # types check, no FP16 at the graph's IO
        a = OrtSession(engines.directory / fp32.main_file, [CPU]).session
        b = fp16_session(engines, spec.name).session
        assert [(i.name, i.type) for i in a.get_inputs()] == [(i.name, i.type) for i in b.get_inputs()]
        assert [(o.name, o.type) for o in a.get_outputs()] == [(o.name, o.type) for o in b.get_outputs()]


def test_check_command_with_fp16(fp16_factory, capsys):
    assert export_main(["check", "--engines", str(fp16_factory("d2c-tiny-none")), "--precision", "fp16"]) == 0
    assert "0 failed" in capsys.readouterr().out


def test_onnx_command_writes_fp16_graphs(tmp_path):
    out = tmp_path / "engines"
    assert export_main(["onnx", "--stage", "diffusion", "--fp16", "--out", str(out), "--max-batch", "2"]) == 0
    manifest = Manifest.read(out / MANIFEST)
    assert set(manifest.stages["diffusion"]) == {"onnx-fp32", "onnx-fp16"}
    assert (out / "diffusion.fp16.onnx").is_file()


@torch.no_grad()
def denoising_head(model):
    """Make the diffusion head predict eps = x_t (to 1e-8): the denoiser of data at 0, so latents stay O(1).

    Random heads predict eps ~ 0, and the sampler then returns x_T * sqrt(1/alpha_bar) ~ 1e4-1e5, latents out
    of any trained model's range and of FP16's. input_proj writes [x, -sum(x), K, -K, 0...] (zero mean, the
    variance dominated by K), the blocks are identities (zero gates), and the final layer undoes the norm.
    """
    head, offset = model.mar.diffloss.net, 1e4
    c, w = head.args.in_channels, head.args.width
    proj, final = head.input_proj, head.final_layer
    proj.weight.zero_()
    proj.weight[:c] = torch.eye(c)
    proj.weight[c] = -1.0
    proj.bias.zero_()
    proj.bias[c + 1], proj.bias[c + 2] = offset, -offset
    for layer in [b.adaLN_modulation[-1] for b in head.res_blocks] + [final.adaLN_modulation[-1]]:
        layer.weight.zero_()
        layer.bias.zero_()
    final.linear.weight.zero_()
    final.linear.weight[:c, :c] = torch.eye(c) * offset * math.sqrt(2 / w)
    final.linear.bias.zero_()
    return model


@pytest.mark.slow
def test_fp16_images_stay_close_to_fp32(tmp_path):
    """End to end with the same seed on a tiny model whose latents have a trained model's range."""
    ckpt = save_checkpoint(denoising_head(random_model(get_config("d2c-tiny"), 0)), tmp_path / "model.safetensors")
    model, source = build_model(ModelRequest(checkpoint=ckpt))
    engines_dir = tmp_path / "engines"
    export_model(model, engines_dir, source, max_batch=4, progress=False)
    engines = Engines.open(engines_dir)
    convert_engines(engines, progress=False)
    params = SamplingParams(cfg=4.0, num_iter=4, diffusion_steps=25)
    images = {}
    for p in (Precision.FP32, Precision.FP16):
        with OrtBackend(engines, p, keep_fp16_rounding=True, provider_list=[CPU]) as backend:
            images[p.value] = generate_images(backend, [1, 7], params, seed=0)[0].images
    assert bool(torch.isfinite(images["fp16"]).all())
    assert psnr(images["fp16"].numpy(), images["fp32"].numpy()) > 40.0
    out = tmp_path / "fp16.png"
    assert run_main(["--engines", str(engines_dir), "--class", "3", "--precision", "fp16", "--backend", "ort",
                     "--num-iter", "2", "--diffusion-steps", "5", "--out", str(out), "--quiet"]) == 0
    assert out.is_file()
