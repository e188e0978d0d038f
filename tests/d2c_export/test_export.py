"""Export mechanics: external data for large graphs, manifest contents, atomic files."""
from __future__ import annotations

import json

from d2c_export import onnx_export
from d2c_export.check import check_stage
from d2c_export.manifest import MANIFEST, Manifest, sha256_file
from d2c_export.runtime import OrtStage
from d2c_export.sources import model_from_args
from d2c_export.stages import STAGES


def test_large_graphs_keep_weights_in_external_data(tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 0)
    model, source = model_from_args("d2c-tiny", None, 0)
    onnx_export.export_model(model, tmp_path, source, stages=["vae"], progress=False)
    manifest = Manifest.load(tmp_path)
    entry = manifest.entry("vae", "onnx-fp32", tmp_path)
    assert set(entry.files) == {"vae.onnx", "vae.onnx.data"}
    assert entry.main_file == "vae.onnx"
    assert all(sha256_file(tmp_path / name) == digest for name, digest in entry.files.items())
    reports = check_stage(model, STAGES["vae"], OrtStage(tmp_path / "vae.onnx", ["CPUExecutionProvider"]))
    assert all(r.passed for r in reports)


def test_manifest_records_what_was_built(engines_factory):
    engines = engines_factory("d2c-tiny")
    data = json.loads((engines / MANIFEST).read_text())
    assert data["source"] == {"random_init_seed": 0}
    assert data["config"]["name"] == "d2c-tiny"
    assert "dynamo=True" in data["exporter"]
    for stage in ("gpt", "cond", "mar", "diffusion", "vae"):
        entry = data["stages"][stage]["onnx-fp32"]
        assert entry["precision"] == "fp32" and entry["opset"] == onnx_export.DEFAULT_OPSET
        assert entry["profile"] and entry["inputs"] and entry["outputs"]
        for axis, (lo, opt, hi) in entry["profile"].items():
            assert lo <= opt <= hi, (stage, axis)
    assert data["stages"]["vae"]["onnx-fp32"]["profile"]["batch"][2] == data["max_batch"]
    assert not [p for p in engines.iterdir() if p.name.startswith(".")], "no temporary files left"


def test_reexport_of_another_model_replaces_the_manifest(tmp_path):
    model, source = model_from_args("d2c-tiny", None, 0)
    onnx_export.export_model(model, tmp_path, source, stages=["vae"], progress=False)
    other, other_source = model_from_args("d2c-tiny", None, 1)
    onnx_export.export_model(other, tmp_path, other_source, stages=["cond"], progress=False)
    manifest = Manifest.load(tmp_path)
    assert manifest.source == {"random_init_seed": 1}
    assert set(manifest.stages) == {"cond"}, "stages of the previous model are not mixed in"
