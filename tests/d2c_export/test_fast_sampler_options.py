"""The fast samplers' settings through every front end: d2c-run, d2c-generate, d2c-bench, d2c-quality and the HTTP
API take them under the same names, record them as the settings they stand for, and refuse what cannot run in one
line, each front end naming the settings its own way."""
from __future__ import annotations

import json

import pytest

from d2c_export.bulk.cli import generate_cli, generate_main
from d2c_export.cli import bench_cli, bench_main, quality_cli, run_cli, run_main
from d2c_export.engines import Engines
from reference.pipeline import SamplingParams
from reference.settings import settings_of
from tests.d2c_export.cli_helpers import assert_one_line_error

FAST_SETTINGS = ("sampler", "diffusion_anneal", "diffusion_anneal_start", "diffusion_floor", "lazy_mar",
                 "lazy_mar_warmup", "lazy_mar_tokens")
SMALL = ["--cfg", "3.0", "--num-iter", "8", "--diffusion-steps", "16"]
# what `--sampler fast` stands for at SMALL: linear from half the 16 steps to the floor 5; LazyMAR's 9 and 5 with
# its token cache
FAST_EXPANDED = {"sampler": "fast", "diffusion_anneal": "linear", "diffusion_anneal_start": 8, "diffusion_floor": 5,
                 "lazy_mar": 9, "lazy_mar_warmup": 5, "lazy_mar_tokens": True}


@pytest.mark.parametrize("command", [run_cli, generate_cli, bench_cli, quality_cli], ids=lambda c: c.name)
def test_every_command_takes_the_fast_samplers_settings_as_flags(command):
    specs = {s.name: s for s in settings_of(SamplingParams)}
    flags = {p.name: p for p in command.params}
    for name in FAST_SETTINGS:
        assert flags[name].opts == [specs[name].flag] and flags[name].help == specs[name].help
    from d2c_export.serve.api import ImageRequest  # not at the top: no pydantic on the GPU image
    fields = ImageRequest.model_json_schema()["properties"]
    assert all(fields[name]["description"] == specs[name].help for name in FAST_SETTINGS)


def test_d2c_run_samples_with_the_preset_what_it_samples_with_the_settings_it_stands_for(engines_factory, tmp_path):
    engines = str(engines_factory("d2c-tiny"))
    base = ["--engines", engines, "--class", "1", "--class", "5", "--seed", "3", "--backend", "ort", "--quiet", *SMALL]
    expanded = [a for k, v in FAST_EXPANDED.items() if k != "sampler"
                for a in ((f"--{k.replace('_', '-')}",) if v is True else (f"--{k.replace('_', '-')}", str(v)))]
    pngs = {}
    for name, extra in {"exact": [], "fast": ["--sampler", "fast"], "expanded": expanded}.items():
        assert run_main([*base, *extra, "--out", str(tmp_path / f"{name}.png")]) == 0
        pngs[name] = (tmp_path / f"{name}.png").read_bytes()
    assert pngs["fast"] == pngs["expanded"] and pngs["fast"] != pngs["exact"]


def test_d2c_generate_records_the_expanded_preset_in_its_plan(engines_factory, tmp_path, monkeypatch):
    """samples.json records the plan's settings; the run itself (on Ray) is `tests/d2c_export/bulk`'s."""
    import d2c_export.bulk.run as bulk_run
    plans = []
    monkeypatch.setattr(bulk_run, "generate_bulk", lambda engines, plan, out, cluster, progress: plans.append(plan))
    assert generate_main(["--engines", str(engines_factory("d2c-tiny")), "--out", str(tmp_path / "set"),
                          "--num-images", "10", "--sampler", "fast", "--quiet", *SMALL]) == 0
    assert {k: plans[0].sampling[k] for k in FAST_EXPANDED} == FAST_EXPANDED


def test_d2c_bench_records_the_expanded_preset_in_bench_json(engines_factory, tmp_path):
    out = tmp_path / "bench"
    assert bench_main(["--engines", str(engines_factory("d2c-tiny")), "--backends", "ort", "--batch", "1",
                       "--repeat", "1", "--sampler", "fast", "--no-plot", "--out", str(out), "--quiet", *SMALL]) == 0
    summary = json.loads((out / "bench.json").read_text())
    assert {k: summary["sampling"][k] for k in FAST_EXPANDED} == FAST_EXPANDED
    cell, = summary["results"]
    counts = SamplingParams(**summary["sampling"]).denoising_counts()
    assert cell["stages"]["diffusion"]["calls_per_generation"] == sum(counts) < 8 * 16


def test_the_api_takes_the_preset_and_records_what_it_stands_for(engines_factory):
    from d2c_export.serve.api import ImageRequest, resolve  # not at the top: no pydantic on the GPU image
    engines = Engines.open(engines_factory("d2c-tiny"))
    request = ImageRequest.model_validate({"class": [1, 2], "sampler": "fast", "cfg": 3.0, "num_iter": 8,
                                           "diffusion_steps": 16})
    job = resolve(request, engines, max_images=64)
    recorded = job.params.as_dict()  # the JSON response's `settings`
    assert {k: recorded[k] for k in FAST_EXPANDED} == FAST_EXPANDED


@pytest.mark.parametrize("body,words", [
    ({"lazy_mar": 9, "cfg": 1.0}, ["lazy_mar: without guidance", "set cfg, add lazy_mar_tokens, or lazy_mar 0"]),
    ({"lazy_mar_tokens": True, "cfg": 3.0}, ["lazy_mar_tokens: needs lazy MAR steps", "set lazy_mar N"]),
    ({"sampler": "fast", "cfg": 3.0, "diffusion_anneal": "cosine"},
     ["diffusion_anneal: is 'cosine'", "sampler fast", "sampler exact"]),
    ({"diffusion_anneal": "linear", "diffusion_steps": 4, "diffusion_floor": 5}, ["diffusion_floor: 5 is above"]),
])
def test_the_api_refuses_what_cannot_run_in_one_line_with_its_json_names(engines_factory, body, words):
    from d2c_export.serve.api import ImageRequest, error_answer, resolve  # not at the top: no pydantic on the GPU image
    engines = Engines.open(engines_factory("d2c-tiny"))
    with pytest.raises(ValueError) as caught:
        resolve(ImageRequest.model_validate({"class": 1, **body}), engines, max_images=64)
    status, message, _ = error_answer(caught.value)
    assert status == 422 and "\n" not in message and "--" not in message
    for word in words:
        assert word in message, message


@pytest.mark.parametrize("main,extra,out", [(run_main, ["--class", "1"], "out.png"),
                                            (generate_main, ["--num-images", "10"], "out")],
                         ids=["d2c-run", "d2c-generate"])
def test_commands_refuse_what_cannot_run_in_one_line_with_their_flags(engines_factory, tmp_path, capsys, main, extra,
                                                                      out):
    code = main(["--engines", str(engines_factory("d2c-tiny")), *extra, "--out", str(tmp_path / out),
                 "--cfg", "1.0", "--lazy-mar", "4", "--quiet"])
    assert_one_line_error(code, capsys.readouterr().err, "--lazy-mar: without guidance",
                          "set --cfg, add --lazy-mar-tokens, or --lazy-mar 0")
    code = main(["--engines", str(engines_factory("d2c-tiny")), *extra, "--out", str(tmp_path / out),
                 "--sampler", "fast", "--diffusion-anneal", "cosine", "--quiet"])
    assert_one_line_error(code, capsys.readouterr().err, "--diffusion-anneal: is 'cosine'", "--sampler fast",
                          "--sampler exact")
    assert not (tmp_path / out).exists()
