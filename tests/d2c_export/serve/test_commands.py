"""`d2c-serve` and `d2c-serve-load` refuse what the replicas could not run, in one line, before Ray starts."""
from __future__ import annotations

import pytest

from d2c_export.serve.cli import load_main, serve_main
from tests.d2c_export.cli_helpers import assert_one_line_error, run_cli


@pytest.mark.parametrize("argv,words", [
    (["--engines", "{tmp}/none"], ("does not exist", "d2c-export onnx")),
    (["--engines", "{engines}", "--max-batch", "5"], ("exceeds the exported profile", "--max-batch 5")),
    (["--engines", "{engines}", "--backend", "ort", "--precision", "fp16"], ("no onnx-fp16 build", "--fp16")),
    (["--engines", "{engines}", "--backend", "ort", "--precision", "bf16"], ("fp32, fp16 only",)),
    (["--engines", "{engines}", "--batch-wait-ms", "nan"], ("not a finite number",)),
    (["--engines", "{engines}", "--replicas", "0"], ("--replicas",)),
], ids=["missing", "max-batch", "fp16", "ort-bf16", "nan-wait", "replicas"])
def test_serve_refuses_in_one_line(engines_factory, tmp_path, capsys, argv, words):
    engines = engines_factory("d2c-tiny")
    argv = [a.format(tmp=tmp_path, engines=engines) for a in argv]
    code, err = run_cli(serve_main, argv, capsys)
    assert code == 2
    assert_one_line_error(code, err, *words)


def test_load_refuses_in_one_line(engines_factory, tmp_path, capsys):
    engines = engines_factory("d2c-tiny")
    code, err = run_cli(load_main, ["--engines", engines, "--max-batches", "4,8"], capsys)
    assert_one_line_error(code, err, "exceeds the exported profile", "--max-batch 8")
    code, err = run_cli(load_main, ["--engines", engines, "--max-batches", "0"], capsys)
    assert_one_line_error(code, err, "positive integers")
