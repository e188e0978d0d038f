"""Every exported stage against its reference module on ONNX Runtime FP32, at several shapes."""
from __future__ import annotations

import onnx
import pytest
import torch

from d2c_export.check import check_stage, compare, parity_sizes
from d2c_export.manifest import Manifest
from d2c_export.runtime import OrtStage
from d2c_export.stages import STAGES, stages_for
from d2c_export.sources import model_from_source

# Each registered stage must appear here with the configs its parity is tested on; a new stage
# without an entry fails `test_every_registered_stage_has_a_parity_test`.
PARITY_CASES: dict[str, tuple[str, ...]] = {
    "gpt": ("d2c-tiny",),
    "cond": ("d2c-tiny", "d2c-tiny-cross_attn"),
    "mar": ("d2c-tiny", "d2c-tiny-cross_attn", "d2c-tiny-none"),
    "diffusion": ("d2c-tiny", "d2c-tiny-none"),
    "vae": ("d2c-tiny",),
}
CASES = [(stage, config) for stage, configs in PARITY_CASES.items() for config in configs]


def test_every_registered_stage_has_a_parity_test():
    from reference.model import get_config
    missing = [s for s in STAGES if s not in PARITY_CASES]
    assert not missing, f"stages without a parity test: {missing}"
    for stage, configs in PARITY_CASES.items():
        assert all(STAGES[stage].applies(get_config(c)) for c in configs), stage


@pytest.mark.parametrize("stage,config", CASES, ids=[f"{s}-{c}" for s, c in CASES])
def test_ort_fp32_matches_reference(engines_factory, stage, config):
    engines = engines_factory(config)
    manifest = Manifest.load(engines)
    model = model_from_source(manifest.d2c_config, manifest.source)
    spec = STAGES[stage]
    entry = manifest.entry(stage, "onnx-fp32", engines)
    session = OrtStage(engines / entry.main_file, ["CPUExecutionProvider"])
    sizes = parity_sizes(spec, model.config)
    assert len({tuple(s.items()) for s in sizes}) == 3, "three distinct shapes, two unlike the export example"
    reports = check_stage(model, spec, session)
    failed = [(r.sizes, r.output, r.result) for r in reports if not r.passed]
    assert not failed, failed
    assert len(reports) == 3 * len(spec.output_specs(model.config))


@pytest.mark.parametrize("config", ["d2c-tiny", "d2c-tiny-none"])
def test_dynamic_axes_are_symbolic(engines_factory, config):
    engines = engines_factory(config)
    manifest = Manifest.load(engines)
    for spec in stages_for(manifest.d2c_config):
        graph = onnx.load(str(engines / manifest.stages[spec.name]["onnx-fp32"].main_file), load_external_data=False)
        values = {v.name: v for v in list(graph.graph.input) + list(graph.graph.output)}
        for t in spec.input_specs(manifest.d2c_config) + spec.output_specs(manifest.d2c_config):
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
