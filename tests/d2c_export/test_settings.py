"""Sampling settings are defined once, on `SamplingParams`: the flags, the API's request fields, the manifest's
recorded settings and the checks are all made from its fields; an error names a setting as each front end does."""
from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from d2c_export.cli import run_cli, run_main
from d2c_export.cli_support import flag_spelling
from reference.errors import BadInput, Setting
from reference.pipeline import SamplingParams
from reference.settings import settings_of
from tests.d2c_export.cli_helpers import assert_one_line_error, run_cli as run_command

ROOT = Path(__file__).resolve().parents[2]
KNOB = '    test_knob: float = setting(0.25, "a test-only knob", 0.0, 1.0)\n'
PROBE = """
import json, sys
from click.testing import CliRunner
from d2c_export.cli import export_main, run_cli
from d2c_export.serve.app import app
out = sys.argv[1]
assert export_main(["onnx", "--config", "d2c-tiny", "--stage", "vae", "--out", out, "--quiet"]) == 0
print(json.dumps({"help": CliRunner().invoke(run_cli, ["--help"]).output,
                  "schema": app.openapi()["components"]["schemas"]["ImageRequest"]["properties"],
                  "manifest": json.load(open(out + "/manifest.json"))["sampling"]}))
"""


def with_knob(source: str) -> str:
    """pipeline.py with one more field on `SamplingParams`, after its docstring, and no other change."""
    cls = next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef) and n.name == "SamplingParams")
    lines = source.splitlines(keepends=True)
    at = cls.body[1].lineno - 1  # the first statement after the docstring
    return "".join(lines[:at] + [KNOB] + lines[at:])


def test_a_new_setting_is_one_field(tmp_path):
    """One field added to SamplingParams (in a copy of the code) is a d2c-run flag, an API field with its range,
    and a setting the manifest records, with no other edit."""
    for package in ("reference", "d2c_export", "training"):
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    pipeline = tmp_path / "reference" / "pipeline.py"
    pipeline.write_text(with_knob(pipeline.read_text()))
    done = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path / "engines")], cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(tmp_path)}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert "--test-knob" in seen["help"] and "a test-only knob" in seen["help"]
    knob = seen["schema"]["test_knob"]
    assert knob["description"] == "a test-only knob"
    assert {"minimum": 0.0, "maximum": 1.0, "type": "number"}.items() <= knob["anyOf"][0].items()
    assert seen["manifest"]["test_knob"] == 0.25


def test_settings_are_read_from_plain_fields_with_metadata():
    @dataclass
    class Plain:
        steps: int = field(default=4, metadata={"help": "steps", "min": 1, "max": 8})
        scale: float | None = field(default=None, metadata={"help": "scale", "min": 0.0, "max": 1.0,
                                                             "min_exclusive": True})
        mode: str = field(default="a", metadata={"help": "mode", "min": None, "max": None, "choices": ("a", "b")})
        internal: int = 3  # no help: not a setting

    steps, scale, mode = settings_of(Plain)
    assert (steps.flag, steps.range_text(), steps.kind) == ("--steps", "[1, 8]", int)
    assert (scale.optional, scale.range_text()) == (True, "(0, 1]")
    assert mode.choices == ("a", "b")
    scale.check(None)
    for spec, value, words in [(steps, 9, "[1, 8], got 9"), (steps, 2.5, "integer"), (scale, 0.0, "(0, 1]"),
                               (scale, float("nan"), "finite"), (mode, "c", "one of a, b"), (steps, True, "number")]:
        with pytest.raises(BadInput, match=words.replace("[", r"\[").replace("(", r"\(")) as caught:
            spec.check(value)
        assert caught.value.setting == spec.name


@pytest.mark.parametrize("name", [s.name for s in settings_of(SamplingParams)])
def test_every_setting_is_a_flag_and_a_request_field_with_the_same_range(name):
    spec = next(s for s in settings_of(SamplingParams) if s.name == name)
    option = next(p for p in run_cli.params if p.name == name)
    assert option.opts == [spec.flag] and option.help == spec.help and option.default is None
    from d2c_export.serve.api import ImageRequest  # not at the top: the GPU image collects this file without pydantic
    request = ImageRequest.model_json_schema()["properties"][name]
    assert request["description"] == spec.help
    numeric = request["anyOf"][0]
    assert numeric.get("maximum", numeric.get("exclusiveMaximum")) == spec.max
    if spec.kind is float:  # a finite upper bound on every real setting, so 1e308 is refused up front
        assert spec.max is not None


def test_a_cfg_of_1e308_is_refused_before_generation():
    with pytest.raises(BadInput, match=r"cfg: must be in \[0, 100\], got 1e\+308"):
        SamplingParams(cfg=1e308)


def test_errors_name_settings_as_each_front_end_does():
    error = BadInput("pass the VAE too (", Setting("vae", "PATH"), "), or load without EMA (", Setting("ema", False),
                     ")", setting="stage2")
    assert str(error) == "stage2: pass the VAE too (vae=PATH), or load without EMA (ema=False)"
    from d2c_export.cli import export_cli
    from d2c_export.serve.api import json_spelling
    assert error.render(flag_spelling(export_cli)) == \
        "--checkpoint: pass the VAE too (--vae PATH), or load without EMA (--no-ema)"
    assert BadInput("too many", setting="classes").render(flag_spelling(run_cli)) == "--class: too many"
    assert BadInput("too many", setting="classes").render(json_spelling) == "class: too many"
    assert BadInput("x", setting="diffusion_steps").render(flag_spelling(run_cli)) == "--diffusion-steps: x"


def test_model_limits_name_the_flag(engines_factory, tmp_path, capsys):
    code, err = run_command(run_main, ["--engines", engines_factory("d2c-tiny"), "--class", "1", "--num-iter", "17",
                                       "--out", tmp_path / "x.png", "--quiet"], capsys)
    assert_one_line_error(code, err, "--num-iter: must be in [1, 16] for this model")
