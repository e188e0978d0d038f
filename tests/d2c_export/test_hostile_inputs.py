"""Hostile and careless input to every command: one `error:` line naming the problem (and the flag), exit 2, no
traceback, and not one file created, replaced or left behind anywhere in the workspace."""
from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch

from d2c_export.cli import bench_main, export_main, quality_main, run_main
from d2c_export.manifest import MANIFEST, config_digest
from reference.checkpoint import save_checkpoint
from reference.files import sha256_file
from reference.model import D2C, get_config
from tests.d2c_export.cli_helpers import assert_one_line_error

TINY = ["--num-iter", "2", "--diffusion-steps", "3", "--quiet"]


def _edit_manifest(edit, rehash_config: bool = False):
    def setup(ws: Path) -> None:
        path = ws / "eng" / MANIFEST
        data = json.loads(path.read_text())
        data = edit(data) or data
        if rehash_config and isinstance(data, dict):
            data["config_sha256"] = config_digest(data["config"])
        path.write_text(json.dumps(data))
    return setup


def _other_graph_as_vae(ws: Path) -> None:
    path = ws / "eng" / MANIFEST
    data = json.loads(path.read_text())
    shutil.copy(ws / "eng" / "mar.onnx", ws / "eng" / "vae.onnx")
    data["stages"]["vae"]["onnx-fp32"]["files"] = {"vae.onnx": sha256_file(ws / "eng" / "vae.onnx")}
    path.write_text(json.dumps(data))


def _truncate(name: str):
    def setup(ws: Path) -> None:
        f = ws / "eng" / name
        f.write_bytes(f.read_bytes()[:500])
    return setup


def _set(key, value):
    return _edit_manifest(lambda d: d.__setitem__(key, value))


RUN = [  # (id, argv after `d2c-run --engines WS/eng`, needles, setup)
    ("class-out-of-range", ["--class", "10"], ["class 10", "0..9"], None),
    ("class-negative", ["--class", "-1"], ["class -1"], None),
    ("too-many-images", ["--class", "1", "--num-images", "5"], ["max batch 4", "--num-images"], None),
    ("two-classes-too-many", ["--class", "1", "--class", "2", "--num-images", "3"], ["at most 4", "2 --class"], None),
    ("num-images-zero", ["--class", "1", "--num-images", "0"], ["--num-images"], None),
    ("cfg-nan", ["--class", "1", "--cfg", "nan"], ["--cfg", "finite"], None),
    ("cfg-inf", ["--class", "1", "--cfg", "inf"], ["--cfg"], None),
    ("cfg-negative", ["--class", "1", "--cfg", "-1"], ["--cfg"], None),
    ("temperature-zero", ["--class", "1", "--temperature", "0"], ["--temperature"], None),
    ("temperature-negative", ["--class", "1", "--temperature", "-2"], ["--temperature"], None),
    ("top-k-negative", ["--class", "1", "--top-k", "-1"], ["--top-k"], None),
    ("top-k-above-vocabulary", ["--class", "1", "--top-k", "100000"], ["--top-k", "64"], None),
    ("top-p-zero", ["--class", "1", "--top-p", "0"], ["--top-p"], None),
    ("top-p-above-one", ["--class", "1", "--top-p", "1.5"], ["--top-p"], None),
    ("diffusion-steps-zero", ["--class", "1", "--diffusion-steps", "0"], ["--diffusion-steps"], None),
    ("diffusion-steps-1001", ["--class", "1", "--diffusion-steps", "1001"], ["--diffusion-steps"], None),
    ("num-iter-zero", ["--class", "1", "--num-iter", "0"], ["--num-iter"], None),
    ("num-iter-above-tokens", ["--class", "1", "--num-iter", "100"], ["--num-iter", "16"], None),
    ("seed-float", ["--class", "1", "--seed", "1e23"], ["--seed"], None),
    ("seed-negative", ["--class", "1", "--seed", "-1"], ["--seed"], None),
    ("seed-huge", ["--class", "1", "--seed", str(2 ** 70)], ["--seed"], None),
    ("class-not-a-number", ["--class", "cat"], ["--class"], None),
    ("unknown-backend", ["--class", "1", "--backend", "tensorflow"], ["--backend", "tensorflow"], None),
    ("ort-bf16", ["--class", "1", "--backend", "ort", "--precision", "bf16"], ["fp32, fp16 only"], None),
    ("ort-fp16-missing", ["--class", "1", "--backend", "ort", "--precision", "fp16"], ["onnx-fp16", "--fp16"], None),
    ("trt-missing", ["--class", "1", "--backend", "trt"], ["TensorRT", "--backend ort"], None),
    ("out-is-directory", ["--class", "1", "--out", "{ws}/adir"], ["adir", "directory"], None),
    ("out-parent-is-file", ["--class", "1", "--out", "{ws}/afile/x.png"], ["afile", "not a directory"], None),
    ("out-is-fifo", ["--class", "1", "--out", "{ws}/fifo"], ["fifo", "not a regular file"], None),
    ("out-is-device", ["--class", "1", "--out", "/dev/full"], ["/dev/full", "not a regular file"], None),
    ("out-symlink-to-directory", ["--class", "1", "--out", "{ws}/link-to-dir"], ["link-to-dir", "directory"], None),
    ("out-empty", ["--class", "1", "--out", ""], ["directory"], None),
    ("unknown-flag", ["--class", "1", "--steps", "3"], ["--steps"], None),
    ("manifest-is-a-list", ["--class", "1"], ["not a manifest", "list"], _edit_manifest(lambda d: [d])),
    ("manifest-max-batch-string", ["--class", "1"], ["max_batch", "str"], _set("max_batch", "16")),
    ("manifest-max-batch-zero", ["--class", "1"], ["max_batch is 0"], _set("max_batch", 0)),
    ("manifest-unknown-config-key", ["--class", "1"], ["config that does not build", "d2c-export onnx"],
     _edit_manifest(lambda d: d["config"]["mar"].__setitem__("wings", 2), rehash_config=True)),
    ("manifest-config-edited", ["--class", "11"], ["config was changed"],
     _edit_manifest(lambda d: d["config"]["mar"].__setitem__("class_num", 20))),
    ("manifest-null-stage", ["--class", "1"], ["stage 'vae'"], _edit_manifest(lambda d: d["stages"].__setitem__(
        "vae", None))),
    ("manifest-file-outside", ["--class", "1", "--backend", "ort"], ["outside the engines directory"],
     _edit_manifest(lambda d: d["stages"]["vae"]["onnx-fp32"].__setitem__("files", {"../afile": "0" * 64}))),
    ("manifest-other-stages-graph", ["--class", "1", "--backend", "ort"], ["vae.onnx", "not the vae stage"],
     _other_graph_as_vae),
    ("manifest-missing", ["--class", "1"], ["manifest.json is missing", "d2c-export onnx"],
     lambda ws: (ws / "eng" / MANIFEST).unlink()),
    ("manifest-not-json", ["--class", "1"], ["not a readable manifest"],
     lambda ws: (ws / "eng" / MANIFEST).write_text("{not json")),
    ("graph-truncated", ["--class", "1", "--backend", "ort"], ["gpt.onnx", "sha256", "--config d2c-tiny"],
     _truncate("gpt.onnx")),
    ("old-format", ["--class", "1"], ["format version 2"], _set("format_version", 2)),
]
RUN_SPECIAL = [
    ("engines-missing", ["--engines", "{ws}/nope", "--class", "1"], ["does not exist", "d2c-export onnx"]),
    ("engines-is-a-file", ["--engines", "{ws}/afile", "--class", "1"], ["not a directory"]),
]
EXPORT = [  # (id, argv of d2c-export, needles)
    ("max-batch-zero", ["onnx", "--config", "d2c-tiny", "--max-batch", "0", "--out", "{ws}/new"], ["--max-batch"]),
    ("max-batch-negative", ["onnx", "--config", "d2c-tiny", "--max-batch", "-4", "--out", "{ws}/new"], ["--max-batch"]),
    ("opset-99", ["onnx", "--config", "d2c-tiny", "--opset", "99", "--out", "{ws}/new"], ["--opset"]),
    ("opset-5", ["onnx", "--config", "d2c-tiny", "--opset", "5", "--out", "{ws}/new"], ["--opset"]),
    ("out-is-a-file", ["onnx", "--config", "d2c-tiny", "--out", "{ws}/afile"], ["--out", "afile"]),
    ("unknown-config", ["onnx", "--config", "d2c-xxl", "--out", "{ws}/new"], ["--config", "d2c-xxl"]),
    ("config-and-checkpoint", ["onnx", "--config", "d2c-tiny", "--checkpoint", "{ws}/nan.safetensors", "--out",
                               "{ws}/new"], ["either --config or --checkpoint"]),
    ("gpt-without-checkpoint", ["onnx", "--gpt", "{ws}/text.pth", "--out", "{ws}/new"], ["--gpt", "--checkpoint"]),
    ("checkpoint-missing", ["onnx", "--checkpoint", "{ws}/none.pth", "--out", "{ws}/new"], ["--checkpoint",
                                                                                            "does not exist"]),
    ("checkpoint-text-safetensors", ["onnx", "--checkpoint", "{ws}/text.safetensors", "--out", "{ws}/new"],
     ["text.safetensors", "not a readable"]),
    ("checkpoint-empty-safetensors", ["onnx", "--checkpoint", "{ws}/empty.safetensors", "--out", "{ws}/new"],
     ["empty.safetensors", "not a readable"]),
    ("checkpoint-text-pth", ["onnx", "--checkpoint", "{ws}/text.pth", "--out", "{ws}/new"], ["text.pth",
                                                                                             "not a readable"]),
    ("checkpoint-carries-code", ["onnx", "--checkpoint", "{ws}/evil.pth", "--out", "{ws}/new"],
     ["evil.pth", "Python code", "was not run"]),
    ("checkpoint-nan-weights", ["onnx", "--checkpoint", "{ws}/nan.safetensors", "--out", "{ws}/new"], ["non-finite"]),
    ("checkpoint-is-directory", ["onnx", "--checkpoint", "{ws}/adir", "--out", "{ws}/new"], ["--checkpoint",
                                                                                             "directory"]),
    ("check-missing-engines", ["check", "--engines", "{ws}/nope"], ["does not exist"]),
    ("check-fp16-missing", ["check", "--engines", "{ws}/eng", "--precision", "fp16"], ["onnx-fp16", "--fp16"]),
    ("check-bad-precision", ["check", "--engines", "{ws}/eng", "--precision", "int8"], ["--precision"]),
    ("trt-without-tensorrt", ["trt", "--engines", "{ws}/eng"], ["TensorRT"]),
    ("convert-out-directory", ["convert", "--out", "{ws}/adir", "--checkpoint", "{ws}/text.pth"], ["--out", "adir"]),
    ("unknown-command", ["tflite"], ["tflite"]),
]
BENCH = [
    ("unknown-backend", ["--backends", "torch,cuda"], ["--backends", "unknown backend 'cuda'"]),
    ("repeated-backend", ["--backends", "ort,ort"], ["--backends", "twice"]),
    ("batch-zero", ["--batch", "0"], ["--batch"]),
    ("batch-above-profile", ["--batch", "5"], ["max batch 4", "--batch"]),
    ("repeat-zero", ["--repeat", "0"], ["--repeat"]),
    ("ort-fp16-missing", ["--backends", "ort,ort-fp16"], ["onnx-fp16", "--fp16"]),
    ("trt-missing", ["--backends", "torch,trt"], ["trt", "TensorRT"]),
    ("cfg-nan", ["--cfg", "nan"], ["--cfg"]),
    ("out-is-a-file", ["--out", "{ws}/afile"], ["--out", "afile"]),
]
QUALITY = [
    ("per-class-zero", ["--per-class", "0"], ["--per-class"]),
    ("json-is-directory", ["--json", "{ws}/adir", "--grid", "{ws}/g.png"], ["--json", "adir"]),
    ("grid-is-fifo", ["--grid", "{ws}/fifo"], ["fifo", "not a regular file"]),
    ("classifier-missing", ["--classifier", "{ws}/none.safetensors"], ["--classifier", "does not exist"]),
    ("fp16-missing", ["--backends", "torch,ort-fp16"], ["onnx-fp16", "--fp16"]),
    ("unknown-backend", ["--backends", "torch,cuda"], ["unknown backend 'cuda'"]),
]
CASES = ([(f"run-{i}", run_main, ["--engines", "{ws}/eng", *TINY, *a], n, s) for i, a, n, s in RUN]
         + [(f"run-{i}", run_main, [*TINY, *a], n, None) for i, a, n in RUN_SPECIAL]
         + [(f"export-{i}", export_main, a, n, None) for i, a, n in EXPORT]
         + [(f"bench-{i}", bench_main, ["--engines", "{ws}/eng", "--no-plot", *TINY, *a], n, None) for i, a, n in BENCH]
         + [(f"quality-{i}", quality_main, ["--engines", "{ws}/eng", *a, "--quiet"], n, None) for i, a, n in QUALITY])


@pytest.fixture(scope="module")
def fixtures(engines_factory, tmp_path_factory) -> Path:
    """The hostile files, made once: checkpoints of every bad kind."""
    root = tmp_path_factory.mktemp("hostile")
    (root / "text.safetensors").write_text("this is not a checkpoint")
    (root / "empty.safetensors").write_bytes(b"")
    (root / "text.pth").write_text("neither is this")
    torch.manual_seed(0)
    model = D2C(get_config("d2c-tiny"))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    save_checkpoint(model, root / "nan.safetensors")
    return root


def _evil(path: Path, marker: Path) -> None:
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    torch.save({"model": Payload()}, path)


@pytest.fixture()
def workspace(fixtures, engines_factory, tmp_path, monkeypatch) -> Path:
    ws = tmp_path / "ws"
    shutil.copytree(fixtures, ws)
    shutil.copytree(engines_factory("d2c-tiny"), ws / "eng")
    _evil(ws / "evil.pth", ws / "PAYLOAD-RAN")
    (ws / "afile").write_text("a file")
    (ws / "adir").mkdir()
    os.mkfifo(ws / "fifo")
    (ws / "link-to-dir").symlink_to(ws / "adir")
    monkeypatch.chdir(ws)  # default outputs (out.png, bench/) would land here
    return ws


def snapshot(root: Path) -> dict[str, tuple]:
    out = {}
    for p in [root, *root.rglob("*")]:
        st = p.lstat()
        out[str(p.relative_to(root))] = (stat.S_IFMT(st.st_mode), st.st_ino, st.st_size, st.st_mtime_ns)
    return out


def test_enough_cases_across_every_command():
    assert len(CASES) >= 40
    assert {main for _, main, _, _, _ in CASES} == {run_main, export_main, bench_main, quality_main}


@pytest.mark.parametrize("case_id,main,argv,needles,setup", CASES, ids=[c[0] for c in CASES])
def test_hostile_input_is_refused_cleanly(workspace, capsys, case_id, main, argv, needles, setup):
    if setup is not None:
        setup(workspace)
    device = os.stat("/dev/full")
    before = snapshot(workspace)
    code = main([a.format(ws=workspace) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, (code, err)
    assert_one_line_error(code, err, *needles)
    assert snapshot(workspace) == before, "a file was created, replaced or left behind"
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode) and os.stat("/dev/full").st_ino == device.st_ino
