"""Every exported stage against its reference module on ONNX Runtime FP32, at several shapes."""
from __future__ import annotations

import onnx
import pytest
import torch

from d2c_export.backends import open_backend
from d2c_export.engines import Engines
from d2c_export.stages import STAGES, stages_for
from d2c_export.backends import Target
from d2c_export.verify.parity import check_stage, compare

# Each registered stage must appear here with the configs its parity is tested on; a new stage
# without an entry fails `test_every_registered_stage_has_a_parity_test`.
PARITY_CASES: dict[str, tuple[str, ...]] = {
    "gpt": ("d2c-tiny",),
    "cond": ("d2c-tiny", "d2c-tiny-cross_attn"),
    "mar": ("d2c-tiny", "d2c-tiny-cross_attn", "d2c-tiny-none"),
    "mar_cached": ("d2c-tiny", "d2c-tiny-cross_attn", "d2c-tiny-none"),
    "mar_fresh": ("d2c-tiny", "d2c-tiny-cross_attn", "d2c-tiny-none"),
    "diffusion": ("d2c-tiny", "d2c-tiny-none"),
    "vae": ("d2c-tiny",),
}
CASES = [(stage, config) for stage, configs in PARITY_CASES.items() for config in configs]


def test_every_registered_stage_has_a_parity_test():
    from reference.model import get_config
    missing = [s for s in STAGES if s not in PARITY_CASES]
    assert not missing, f"stages without a parity test: {missing}"
    for stage, configs in PARITY_CASES.items():
        assert configs and all(STAGES[stage].applies(get_config(c)) for c in configs), stage


@pytest.mark.parametrize("stage,config", CASES, ids=[f"{s}-{c}" for s, c in CASES])
def test_ort_fp32_matches_reference(engines_factory, stage, config):
    engines = Engines.open(engines_factory(config))
    spec = STAGES[stage]
    sizes = spec.parity_cases(engines.config, engines.max_batch)
    assert len({tuple(s.items()) for s in sizes}) == 3, "three distinct shapes, two unlike the export example"
    with open_backend(engines, Target.parse("ort")) as backend:
        reports = check_stage(engines.model(), spec, backend, engines.max_batch)
    failed = [(r.sizes, r.output, r.result) for r in reports if not r.passed]
    assert not failed, failed
    assert len(reports) == 3 * len(spec.output_specs(engines.config))
    assert {r.kind for r in reports} == {"onnx-fp32"}


@pytest.mark.parametrize("config", ["d2c-tiny", "d2c-tiny-none"])
def test_dynamic_axes_are_symbolic(engines_factory, config):
    engines = Engines.open(engines_factory(config))
    for spec in stages_for(engines.config):
        graph = onnx.load(str(engines.file(spec.name, "onnx-fp32")), load_external_data=False)
        values = {v.name: v for v in list(graph.graph.input) + list(graph.graph.output)}
        for t in spec.input_specs(engines.config) + spec.output_specs(engines.config):
            dims = values[t.name].type.tensor_type.shape.dim
            for i, want in enumerate(t.shape):
                assert bool(dims[i].dim_param) == isinstance(want, str), (spec.name, t.name, i)


def test_compare_metrics():
    ref = torch.tensor([1.0, -2.0, 4.0]).numpy()
    same = compare(ref, ref)
    assert same.max_abs == 0 and same.rel_l2 == 0 and same.cosine == pytest.approx(1.0)
    off = compare(ref * 1.01, ref)
    assert off.max_rel == pytest.approx(0.01, rel=1e-6) and off.rel_l2 == pytest.approx(0.01, rel=1e-6)
    bad = compare(ref * float("nan"), ref)
    assert not bad.finite


def test_a_backend_off_by_more_than_the_tolerance_fails(engines_factory):
    """The check bites: outputs scaled by 1 + 1e-4 pass no FP32 limit (1e-5), and every such output fails."""
    from d2c_export.backends.base import Wrapper
    engines = Engines.open(engines_factory("d2c-tiny"))

    class Off(Wrapper):
        target = Target.parse("ort")

        def run(self, stage, inputs):
            return tuple(o * (1 + 1e-4) for o in self.inner.run(stage, inputs))

    with open_backend(engines, Target.parse("ort")) as backend:
        reports = check_stage(engines.model(), STAGES["vae"], Off(backend), engines.max_batch)
    assert reports and not any(r.passed for r in reports)


def test_every_kind_has_a_stated_tolerance():
    for spec in STAGES.values():
        for kind in ("onnx-fp32", "onnx-fp16", "trt-fp32", "trt-fp16"):
            tol = spec.tolerance(kind)
            assert 0 < tol.max_rel < 1 and 0 < tol.rel_l2 < 1 and 0.99 < tol.min_cosine < 1
    with pytest.raises(ValueError, match="no tolerance"):
        STAGES["vae"].tolerance("onnx-int8")


def test_token_cache_stages_with_layers_after_the_cut_match_the_reference(tmp_path):
    """The tiny presets' one-layer decoders cut at layer 0 with no layer after it, so `mar_fresh` has no cache of
    later layers there: a three-layer decoder (cut at 1, one cached layer) covers that input and output."""
    from d2c_export.export.onnx import export_model
    from d2c_export.sources import random_model
    from reference.mar_cache import cached_layers
    from reference.model import get_config
    config = get_config("d2c-tiny")
    config.mar.decoder_depth = 3
    assert cached_layers(config.mar.decoder_depth) == 1
    export_model(random_model(config, 0), tmp_path, {"random_init_seed": 0}, max_batch=2, progress=False)
    engines = Engines.open(tmp_path)
    names = {spec.name: [t.name for t in spec.input_specs(config) + spec.output_specs(config)]
             for spec in stages_for(config)}
    assert "dec_cache" in names["mar_fresh"] and "fresh_rows" in names["mar_fresh"]
    with open_backend(engines, Target.parse("ort")) as backend:
        for stage in ("mar_cached", "mar_fresh"):
            reports = check_stage(engines.model(), STAGES[stage], backend, engines.max_batch)
            failed = [(r.sizes, r.output, r.result) for r in reports if not r.passed]
            assert reports and not failed, (stage, failed)
