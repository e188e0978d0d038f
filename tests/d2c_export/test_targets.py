"""Backend and precision: one spelling, parsed once, a combination that cannot run refused."""
from __future__ import annotations

import pytest

from d2c_export.cli import run_main
from d2c_export.backends import Precision, Target, TargetError, choices, parse_list
from tests.d2c_export.cli_helpers import assert_one_line_error, run_cli


@pytest.mark.parametrize("name,backend,precision,kind", [
    ("torch", "torch", Precision.FP32, None),
    ("ort", "ort", Precision.FP32, "onnx-fp32"),
    ("ort-fp16", "ort", Precision.FP16, "onnx-fp16"),
    ("trt", "trt", Precision.FP32, "trt-fp32"),
    ("trt-fp16", "trt", Precision.FP16, "trt-fp16"),
])
def test_names_parse_to_one_meaning(name, backend, precision, kind):
    target = Target.parse(name)
    assert (target.backend, target.precision, target.kind, target.name) == (backend, precision, kind, name)
    assert name in choices()


@pytest.mark.parametrize("name,needle", [("ort-bf16", "ort backend runs fp32, fp16 only"),
                                         ("trt-bf16", "trt backend runs fp32, fp16 only"), ("cuda", "unknown backend"),
                                         ("ort-int8", "unknown precision")])
def test_what_cannot_run_is_refused(name, needle):
    with pytest.raises(TargetError, match=needle):
        Target.parse(name)


def test_lists_refuse_repeats_and_emptiness():
    assert [t.name for t in parse_list("torch, ort-fp16")] == ["torch", "ort-fp16"]
    with pytest.raises(TargetError, match="twice"):
        parse_list("ort,ort-fp32")
    with pytest.raises(TargetError, match="no backend"):
        parse_list(" , ")


def test_bf16_on_onnx_runtime_is_an_error_not_fp32(engines_factory, tmp_path, capsys):
    out = tmp_path / "x.png"
    code, err = run_cli(run_main, ["--engines", engines_factory("d2c-tiny"), "--class", "1", "--backend", "ort",
                                   "--precision", "bf16", "--out", out, "--quiet"], capsys)
    assert_one_line_error(code, err, "ort backend runs fp32, fp16 only, not bf16")
    assert not out.exists()
