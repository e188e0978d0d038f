"""Export mechanics: external data for large graphs, manifest contents, atomic files."""
from __future__ import annotations

import json
import logging

import torch

from d2c_export.backends.base import Backend
from d2c_export.backends.ort import CPU, OrtSession
from d2c_export.engines import Engines
from d2c_export.export import onnx as onnx_export
from d2c_export.manifest import MANIFEST, Manifest
from d2c_export.sources import ModelRequest, build_model
from d2c_export.stages import STAGES
from d2c_export.backends import Target
from d2c_export.verify.parity import check_stage
from reference.files import sha256_file


class OneGraph(Backend):
    """ONNX Runtime FP32 on the CPU over one stage's graph (the directory holds no other stage)."""

    def __init__(self, engines: Engines, stage: str):
        self.target = Target.parse("ort")
        self.config = engines.config
        self.max_batch = engines.max_batch
        self.stage = stage
        self.session = OrtSession(engines.file(stage, "onnx-fp32"), [CPU])
        self.description = f"ONNX Runtime over {stage}.onnx"

    def run(self, stage, inputs):
        assert stage == self.stage, stage
        out = self.session.run({name: t.numpy() for name, t in inputs.items()})
        return tuple(torch.from_numpy(out[name]) for name in self.output_names(stage))


def test_large_graphs_keep_weights_in_external_data(tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 0)
    model, source = build_model(ModelRequest(config="d2c-tiny", checkpoint=None, seed=0))
    onnx_export.export_model(model, tmp_path, source, stages=["vae"], progress=False)
    engines = Engines.open(tmp_path)
    entry = engines.entry("vae", "onnx-fp32")
    assert set(entry.files) == {"vae.onnx", "vae.onnx.data"}
    assert entry.main_file == "vae.onnx"
    assert all(sha256_file(tmp_path / name) == digest for name, digest in entry.files.items())
    with OneGraph(engines, "vae") as backend:
        reports = check_stage(model, STAGES["vae"], backend, engines.max_batch)
    assert reports
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


def test_reexport_of_another_model_replaces_the_manifest(tmp_path, caplog):
    model, source = build_model(ModelRequest(config="d2c-tiny", checkpoint=None, seed=0))
    names = [f"kind {c}" for c in range(model.config.num_classes)]
    with caplog.at_level(logging.INFO, logger=onnx_export.__name__):
        onnx_export.export_model(model, tmp_path, source, stages=["vae"], progress=False, class_names=names)
        assert "replacing" not in caplog.text, "a first export replaces nothing"
        onnx_export.export_model(model, tmp_path, source, stages=["cond"], progress=False)
        assert f"replacing stages cond of the export in {tmp_path} (the same model); keeping stages vae" in caplog.text
        assert Manifest.read(tmp_path / MANIFEST).class_names == names, "the same model keeps its class names"
        other, other_source = build_model(ModelRequest(config="d2c-tiny", checkpoint=None, seed=1))
        onnx_export.export_model(other, tmp_path, other_source, stages=["cond"], progress=False)
    assert f"replacing the export in {tmp_path} (d2c-tiny, max batch" in caplog.text
    assert "every stage and build it lists (onnx-fp32) goes" in caplog.text
    manifest = Manifest.read(tmp_path / MANIFEST)
    assert manifest.source == {"random_init_seed": 1}
    assert set(manifest.stages) == {"cond"}, "stages of the previous model are not mixed in"
    assert manifest.class_names is None, "another model's classes are not named by the previous one's names"
