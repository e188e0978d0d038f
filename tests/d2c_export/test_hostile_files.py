"""Hostile files and careless commands, round two: every JSON and safetensors file the commands read, sizes past the
documented limits, outputs that cannot be written or would replace an input, FIFOs and file formats. Each case ends
with one `error:` line, exit 2 and nothing created or replaced; the work of a command never starts before its outputs
are checked."""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from d2c_export.cli import bench_main, export_main, quality_main, run_main
from d2c_export.manifest import MANIFEST, config_digest
from reference.checkpoint import save_checkpoint
from reference.model import D2C, get_config
from tests.conftest import OFFICIAL
from tests.d2c_export.cli_helpers import assert_one_line_error, snapshot

TINY = ["--num-iter", "2", "--diffusion-steps", "3", "--quiet"]
CLASSIFIER = Path(__file__).resolve().parents[2] / "checkpoints" / "shapes-classifier.safetensors"
DEEP = "[" * 100_000 + "]" * 100_000  # past Python's recursion limit
NESTED = "[" * 40 + "1" + "]" * 40  # under it, past the readers' depth limit


# -- hostile files, made in the workspace ---------------------------------------------------------------
def edit_manifest(edit, rehash: bool = False):
    def setup(ws: Path) -> None:
        path = ws / "eng" / MANIFEST
        data = json.loads(path.read_text())
        data = edit(data) or data
        if rehash:
            data["config_sha256"] = config_digest(data["config"])
        path.write_text(json.dumps(data))
    return setup


def manifest_text(text: str):
    return lambda ws: (ws / "eng" / MANIFEST).write_text(text)


def manifest_field(key: str, value, rehash: bool = False):
    return edit_manifest(lambda d: d.__setitem__(key, value), rehash)


def config_field(part: str, key: str, value):
    return edit_manifest(lambda d: d["config"][part].__setitem__(key, value), rehash=True)


def rewrite_header(path: Path, edit, data_edit=None) -> None:
    """Rewrite a safetensors file's JSON header by `edit(header)` (and its data by `data_edit(bytes)`)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    data = raw[8 + n:]
    header = edit(header) or header
    text = header if isinstance(header, (bytes, str)) else json.dumps(header)
    text = text.encode() if isinstance(text, str) else text
    data = data_edit(data) if data_edit else data
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def first_tensor(header: dict) -> str:
    return next(k for k in sorted(header) if k != "__metadata__")


def tensor_field(name: str, field: str, value):
    def edit(h):
        h[first_tensor(h)][field] = value
    return lambda ws: rewrite_header(ws / name, edit)


def metadata(name: str, key: str, value: str):
    def edit(h):
        h["__metadata__"][key] = value
    return lambda ws: rewrite_header(ws / name, edit)


def fifo_for(relative: str):
    def setup(ws: Path) -> None:
        (ws / relative).unlink()
        os.mkfifo(ws / relative)
    return setup


def last_offsets_past_the_file(name: str):
    def edit(h):
        last = max((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][1])
        h[last]["data_offsets"][1] += 4096
    return lambda ws: rewrite_header(ws / name, edit)


def overlapping_offsets(name: str):
    def edit(h):
        a, b = [k for k in sorted(h) if k != "__metadata__"][:2]
        h[b]["data_offsets"] = list(h[a]["data_offsets"])
    return lambda ws: rewrite_header(ws / name, edit)


def link(name: str, target: str):
    return lambda ws: (ws / name).symlink_to(ws / target)


# -- the cases: (id, command, argv, setup, needles) ------------------------------------------------------
RUN = ["--engines", "{ws}/eng", "--class", "1", *TINY]
JSON_FILES = [
    ("manifest-deep", run_main, RUN, manifest_text(DEEP), ["manifest.json", "deeper than"]),
    ("manifest-nested", run_main, RUN, manifest_text(NESTED), ["manifest.json", "deeper than"]),
    ("manifest-nested-config", run_main, RUN, manifest_field("config", json.loads(NESTED), rehash=True),
     ["manifest.json", "deeper than"]),
    ("manifest-string", run_main, RUN, manifest_text('"engines"'), ["manifest.json", "not an object"]),
    ("manifest-source-string", run_main, RUN, manifest_field("source", "demo"), ["manifest.json", "source"]),
    ("manifest-source-official-list", run_main, RUN, manifest_field("source", {"official": []}),
     ["manifest.json", "source"]),
    ("manifest-config-mar-list", run_main, RUN, edit_manifest(lambda d: d["config"].__setitem__("mar", [1]), True),
     ["manifest.json", "config.mar"]),
    ("manifest-config-vae-string", run_main, RUN, edit_manifest(lambda d: d["config"].__setitem__("vae", "kl16"),
                                                                True), ["manifest.json", "config.vae"]),
    ("manifest-config-depth-string", run_main, RUN, config_field("mar", "encoder_depth", "1"),
     ["manifest.json", "config.mar.encoder_depth"]),
    ("manifest-config-ch-mult-map", run_main, RUN, config_field("vae", "ch_mult", {"a": 1}),
     ["manifest.json", "config.vae.ch_mult"]),
    ("manifest-sampling-list", run_main, RUN, manifest_field("sampling", [4.0]), ["manifest.json", "sampling"]),
    ("manifest-sampling-nested", run_main, RUN, manifest_field("sampling", {"cfg": {"a": [1]}}),
     ["manifest.json", "sampling.cfg"]),
    ("manifest-inputs-strings", run_main, RUN + ["--backend", "ort"], edit_manifest(
        lambda d: d["stages"]["vae"]["onnx-fp32"].__setitem__("inputs", ["latents"])), ["manifest.json", "inputs"]),
    ("manifest-tensorrt-list", run_main, RUN, edit_manifest(
        lambda d: d["stages"]["vae"]["onnx-fp32"].__setitem__("tensorrt", [1])), ["manifest.json", "tensorrt"]),
    ("manifest-class-names-count", run_main, RUN, manifest_field("class_names", ["a", "b"]),
     ["manifest.json", "class_names", "2 names for the model's 10 classes", "--class-names"]),
    ("manifest-class-names-empty", run_main, RUN, manifest_field("class_names", ["a"] * 9 + [" "]),
     ["manifest.json", "class_names", "name 9 is empty"]),
    ("manifest-class-names-long", run_main, RUN, manifest_field("class_names", ["a" * 101] + ["b"] * 9),
     ["manifest.json", "class_names[0]", "101 characters (at most 100)"]),
    ("manifest-class-names-numbers", run_main, RUN, manifest_field("class_names", list(range(10))),
     ["manifest.json", "class_names[0]", "not a string"]),
    ("manifest-class-names-object", run_main, RUN, manifest_field("class_names", {"0": "cat"}),
     ["manifest.json", "class_names", "not a list"]),
    ("manifest-class-names-newline", run_main, RUN, manifest_field("class_names", ["a"] * 9 + ["b\nerror: c"]),
     ["manifest.json", "class_names", "name 9", "control character"]),
    ("manifest-file-name-number", run_main, RUN, edit_manifest(
        lambda d: d["stages"]["vae"]["onnx-fp32"].__setitem__("files", {"vae.onnx": 7})), ["manifest.json", "files"]),
    ("checkpoint-config-deep", export_main, ["onnx", "--checkpoint", "{ws}/tiny.safetensors", "--out", "{ws}/new"],
     metadata("tiny.safetensors", "d2c_config", DEEP), ["tiny.safetensors", "deeper than"]),
    ("checkpoint-config-list", export_main, ["onnx", "--checkpoint", "{ws}/tiny.safetensors", "--out", "{ws}/new"],
     metadata("tiny.safetensors", "d2c_config", "[1, 2]"), ["tiny.safetensors", "d2c_config", "not an object"]),
    ("checkpoint-config-gpt-list", export_main, ["convert", "--checkpoint", "{ws}/tiny.safetensors", "--out",
                                                 "{ws}/out.safetensors"],
     metadata("tiny.safetensors", "d2c_config", json.dumps({**get_config("d2c-tiny").to_dict(), "gpt": [1]})),
     ["tiny.safetensors", "gpt"]),
    ("checkpoint-config-name-map", export_main, ["onnx", "--checkpoint", "{ws}/tiny.safetensors", "--out",
                                                 "{ws}/new"],
     metadata("tiny.safetensors", "d2c_config", json.dumps({**get_config("d2c-tiny").to_dict(), "name": {}})),
     ["tiny.safetensors", "name"]),
    ("classifier-meta-deep", quality_main, ["--engines", "{ws}/eng", "--classifier", "{ws}/cls.safetensors"],
     metadata("cls.safetensors", "shapes_classifier", DEEP), ["cls.safetensors", "deeper than"]),
    ("classifier-meta-list", quality_main, ["--engines", "{ws}/eng", "--classifier", "{ws}/cls.safetensors"],
     metadata("cls.safetensors", "shapes_classifier", "[10, 32]"), ["cls.safetensors", "not an object"]),
    ("classifier-meta-classes-string", quality_main, ["--engines", "{ws}/eng", "--classifier",
                                                      "{ws}/cls.safetensors"],
     metadata("cls.safetensors", "shapes_classifier", '{"num_classes": "10", "width": 32, "feature_dim": 64}'),
     ["cls.safetensors", "num_classes"]),
]
CONVERT = ["convert", "--out", "{ws}/out.safetensors", "--checkpoint"]
SAFETENSORS = [
    ("native-shape-2-40", export_main, [*CONVERT, "{ws}/tiny.safetensors"],
     tensor_field("tiny.safetensors", "shape", [2 ** 40]), ["tiny.safetensors", "shape"]),
    ("native-shape-negative", export_main, [*CONVERT, "{ws}/tiny.safetensors"],
     tensor_field("tiny.safetensors", "shape", [-1]), ["tiny.safetensors", "shape"]),
    ("native-offsets-past-the-file", export_main, [*CONVERT, "{ws}/tiny.safetensors"],
     last_offsets_past_the_file("tiny.safetensors"), ["tiny.safetensors"]),
    ("native-unknown-dtype", export_main, ["onnx", "--checkpoint", "{ws}/tiny.safetensors", "--out", "{ws}/new"],
     tensor_field("tiny.safetensors", "dtype", "F128"), ["tiny.safetensors", "dtype"]),
    ("native-offsets-overlap", export_main, ["onnx", "--checkpoint", "{ws}/tiny.safetensors", "--out", "{ws}/new"],
     overlapping_offsets("tiny.safetensors"), ["tiny.safetensors", "offsets"]),
    ("bare-shape-2-40", export_main, [*CONVERT, "{ws}/gpt.safetensors"],
     tensor_field("gpt.safetensors", "shape", [2 ** 40]), ["gpt.safetensors", "shape"]),
    ("bare-shape-negative", export_main, [*CONVERT, "{ws}/gpt.safetensors"],
     tensor_field("gpt.safetensors", "shape", [4, -1]), ["gpt.safetensors", "shape"]),
    ("bare-offsets-overlap", export_main, [*CONVERT, "{ws}/gpt.safetensors"],
     overlapping_offsets("gpt.safetensors"), ["gpt.safetensors", "offsets"]),
    ("bare-offsets-reversed", export_main, [*CONVERT, "{ws}/gpt.safetensors"],
     tensor_field("gpt.safetensors", "data_offsets", [8, 0]), ["gpt.safetensors", "offsets"]),
    ("bare-header-list", export_main, [*CONVERT, "{ws}/gpt.safetensors"],
     lambda ws: rewrite_header(ws / "gpt.safetensors", lambda h: "[1, 2]"), ["gpt.safetensors", "not an object"]),
    ("classifier-shape-2-40", quality_main, ["--engines", "{ws}/eng", "--classifier", "{ws}/cls.safetensors"],
     tensor_field("cls.safetensors", "shape", [2 ** 40]), ["cls.safetensors", "shape"]),
    ("classifier-offsets-past-the-file", quality_main, ["--engines", "{ws}/eng", "--classifier",
                                                        "{ws}/cls.safetensors"],
     last_offsets_past_the_file("cls.safetensors"), ["cls.safetensors"]),
    ("classifier-of-other-sizes", quality_main, ["--engines", "{ws}/eng", "--classifier", "{ws}/cls.safetensors"],
     metadata("cls.safetensors", "shapes_classifier", '{"num_classes": 7, "width": 32, "feature_dim": 64}'),
     ["cls.safetensors", "head.weight"]),
    ("classifier-of-10-12-classes", quality_main, ["--engines", "{ws}/eng", "--classifier", "{ws}/cls.safetensors"],
     metadata("cls.safetensors", "shapes_classifier", '{"num_classes": 1000000000000, "width": 32, '
                                                      '"feature_dim": 64}'), ["cls.safetensors", "num_classes"]),
    ("classifier-text", quality_main, ["--engines", "{ws}/eng", "--classifier", "{ws}/afile"], None,
     ["afile", "not a safetensors file"]),
]
SIZES = [
    ("export-max-batch-10-20", export_main, ["onnx", "--config", "d2c-tiny", "--max-batch", str(10 ** 20), "--out",
                                             "{ws}/new"], None, ["--max-batch", "4096"]),
    ("export-max-batch-2-31", export_main, ["onnx", "--config", "d2c-tiny", "--max-batch", str(2 ** 31), "--out",
                                            "{ws}/new"], None, ["--max-batch", "4096"]),
    ("manifest-max-batch-10-12", run_main, RUN, manifest_field("max_batch", 10 ** 12), ["manifest.json",
                                                                                       "max_batch", "4096"]),
    ("manifest-profile-10-12", run_main, RUN, edit_manifest(
        lambda d: d["stages"]["vae"]["onnx-fp32"]["profile"].__setitem__("batch", [1, 1, 10 ** 12])),
     ["manifest.json", "profile"]),
    ("run-num-images-billions", run_main, [*RUN, "--num-images", str(3 * 10 ** 9)], None, ["--num-images", "4096"]),
    ("run-num-images-10-20", run_main, [*RUN, "--num-images", str(10 ** 20)], None, ["--num-images"]),
    ("quality-per-class-billions", quality_main, ["--engines", "{ws}/eng", "--per-class", str(10 ** 9)], None,
     ["--per-class"]),
    ("quality-real-per-class-billions", quality_main, ["--engines", "{ws}/eng", "--real-per-class", str(10 ** 9)],
     None, ["--real-per-class"]),
    ("bench-batch-10-12", bench_main, ["--engines", "{ws}/eng", "--no-plot", "--batch", str(10 ** 12), *TINY], None,
     ["--batch"]),
    ("bench-threads-10-9", bench_main, ["--engines", "{ws}/eng", "--no-plot", "--threads", str(10 ** 9), *TINY], None,
     ["--threads"]),
    ("quality-threads-10-9", quality_main, ["--engines", "{ws}/eng", "--threads", str(10 ** 9)], None, ["--threads"]),
]
OUTPUTS = [  # each command's outputs: refused before its work (see `no_work`)
    ("bench-out-unwritable", bench_main, ["--engines", "{ws}/eng", "--no-plot", "--out", "/proc/d2c-bench", *TINY],
     None, ["--out", "/proc"]),
    ("bench-out-loop", bench_main, ["--engines", "{ws}/eng", "--no-plot", "--out", "{ws}/loop", *TINY], None,
     ["--out", "loop", "symlink loop"]),
    ("bench-out-through-loop", bench_main, ["--engines", "{ws}/eng", "--no-plot", "--out", "{ws}/loop/b", *TINY],
     None, ["--out", "symlink loop"]),
    ("bench-out-under-a-file", bench_main, ["--engines", "{ws}/eng", "--no-plot", "--out", "{ws}/afile/b", *TINY],
     None, ["--out", "afile", "not a directory"]),
    ("bench-out-empty", bench_main, ["--engines", "{ws}/eng", "--no-plot", "--out", "", *TINY], None,
     ["--out", "empty"]),
    ("bench-config-out-loop", bench_main, ["--config", "d2c-tiny", "--no-plot", "--out", "{ws}/loop", *TINY], None,
     ["--out", "symlink loop"]),
    ("bench-report-file-is-directory", bench_main, ["--engines", "{ws}/eng", "--no-plot", "--out", "{ws}/bdir",
                                                    *TINY], lambda ws: (ws / "bdir" / "bench.json").mkdir(parents=True),
     ["bench.json", "directory"]),
    ("run-out-loop", run_main, [*RUN, "--out", "{ws}/loop"], None, ["--out", "loop", "symlink loop"]),
    ("run-out-through-loop", run_main, [*RUN, "--out", "{ws}/loop/x.png"], None, ["--out", "symlink loop"]),
    ("run-out-unwritable", run_main, [*RUN, "--out", "/proc/x.png"], None, ["--out", "/proc"]),
    ("run-out-dangling-parent", run_main, [*RUN, "--out", "{ws}/dangling/x.png"], None, ["--out", "dangling"]),
    ("quality-json-loop", quality_main, ["--engines", "{ws}/eng", "--json", "{ws}/loop"], None,
     ["--json", "symlink loop"]),
    ("quality-grid-through-loop", quality_main, ["--engines", "{ws}/eng", "--grid", "{ws}/loop/g.png"], None,
     ["--grid", "symlink loop"]),
    ("quality-json-unwritable", quality_main, ["--engines", "{ws}/eng", "--json", "/proc/q.json"], None,
     ["--json", "/proc"]),
    ("convert-out-loop", export_main, [*CONVERT, "{ws}/tiny.safetensors", "--out", "{ws}/loop"], None,
     ["--out", "symlink loop"]),
    ("convert-out-unwritable", export_main, [*CONVERT, "{ws}/tiny.safetensors", "--out", "/proc/c.safetensors"],
     None, ["--out", "/proc"]),
    ("export-out-loop", export_main, ["onnx", "--config", "d2c-tiny", "--out", "{ws}/loop"], None,
     ["--out", "symlink loop"]),
    ("export-out-unwritable", export_main, ["onnx", "--config", "d2c-tiny", "--out", "/proc/eng"], None,
     ["--out", "/proc"]),
    ("export-out-empty", export_main, ["onnx", "--config", "d2c-tiny", "--out", ""], None, ["--out", "empty"]),
]
INPUTS = [  # an output that would replace one of the command's inputs
    ("run-out-is-a-graph", run_main, [*RUN, "--out", "{ws}/eng/gpt.onnx"], None, ["--out", "gpt.onnx", "input"]),
    ("run-out-is-the-manifest", run_main, [*RUN, "--out", "{ws}/eng/manifest.png"],
     lambda ws: (ws / "eng" / "manifest.png").symlink_to(ws / "eng" / MANIFEST), ["--out", "manifest.json", "input"]),
    ("run-out-links-to-a-graph", run_main, [*RUN, "--out", "{ws}/g.png"], link("g.png", "eng/vae.onnx"),
     ["--out", "vae.onnx", "input"]),
    ("quality-json-is-the-manifest", quality_main, ["--engines", "{ws}/eng", "--json", "{ws}/eng/manifest.json"],
     None, ["--json", "manifest.json", "input"]),
    ("quality-grid-is-the-classifier", quality_main, ["--engines", "{ws}/eng", "--classifier", "{ws}/cls.png",
                                                      "--grid", "{ws}/cls.png"],
     lambda ws: shutil.copy(ws / "cls.safetensors", ws / "cls.png"), ["--grid", "cls.png", "input"]),
    ("convert-out-is-the-checkpoint", export_main, [*CONVERT, "{ws}/tiny.safetensors", "--out",
                                                    "{ws}/tiny.safetensors"], None, ["--out", "tiny.safetensors",
                                                                                      "input"]),
    ("convert-out-links-to-the-checkpoint", export_main, [*CONVERT, "{ws}/tiny.safetensors", "--out",
                                                          "{ws}/l.safetensors"],
     link("l.safetensors", "tiny.safetensors"), ["--out", "tiny.safetensors", "input"]),
]
FILES_AND_FORMATS = [
    ("graph-is-a-fifo", run_main, [*RUN, "--backend", "ort"], fifo_for("eng/gpt.onnx"),
     ["gpt.onnx", "not a regular file"]),
    ("manifest-is-a-fifo", run_main, RUN, fifo_for(f"eng/{MANIFEST}"), ["manifest.json", "not a regular file"]),
    ("classifier-is-a-fifo", quality_main, ["--engines", "{ws}/eng", "--classifier", "{ws}/fifo"], None,
     ["--classifier", "fifo", "not a regular file"]),
    ("checkpoint-is-a-fifo", export_main, ["onnx", "--checkpoint", "{ws}/fifo", "--out", "{ws}/new"], None,
     ["fifo", "not a regular file"]),
    ("run-out-jpg", run_main, [*RUN, "--out", "{ws}/x.jpg"], None, ["--out", "x.jpg", ".png"]),
    ("run-out-no-suffix", run_main, [*RUN, "--out", "{ws}/image"], None, ["--out", "image", ".png"]),
    ("quality-grid-webp", quality_main, ["--engines", "{ws}/eng", "--grid", "{ws}/g.webp"], None,
     ["--grid", "g.webp", ".png"]),
]
CLASSES = {"json": JSON_FILES, "safetensors": SAFETENSORS, "sizes": SIZES, "outputs": OUTPUTS, "inputs": INPUTS,
           "files": FILES_AND_FORMATS}
CASES = [(f"{cls}-{i}", main, argv, setup, needles) for cls, cases in CLASSES.items()
         for i, main, argv, setup, needles in cases]


@pytest.fixture(scope="module")
def hostile_files(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hostile_files")
    torch.manual_seed(0)
    save_checkpoint(D2C(get_config("d2c-tiny")), root / "tiny.safetensors")
    shutil.copy(OFFICIAL / "gpt_tiny_a" / "model.safetensors", root / "gpt.safetensors")
    shutil.copy(CLASSIFIER, root / "cls.safetensors")
    return root


@pytest.fixture()
def workspace(hostile_files, engines_factory, tmp_path, monkeypatch) -> Path:
    ws = tmp_path / "ws"
    shutil.copytree(hostile_files, ws)
    shutil.copytree(engines_factory("d2c-tiny"), ws / "eng")
    (ws / "afile").write_text("a file")
    os.mkfifo(ws / "fifo")
    (ws / "loop").symlink_to(ws / "loop")
    (ws / "dangling").symlink_to(ws / "nowhere")
    monkeypatch.chdir(ws)
    return ws


@pytest.fixture()
def no_work(monkeypatch):
    """Every command's work fails the test if it starts: the case must be refused before it."""
    import d2c_export.bench.run
    import d2c_export.export.onnx
    import d2c_export.generate
    import d2c_export.verify.quality
    import reference.official

    def work(*args, **kwargs):
        raise AssertionError("the command's work started before its outputs were checked")
    for module, name in [(d2c_export.generate, "generate_with"), (d2c_export.bench.run, "run_benchmark"),
                         (d2c_export.bench.run, "bench_from_config"), (d2c_export.export.onnx, "export_stage"),
                         (d2c_export.verify.quality, "evaluate_backends"), (reference.official, "assemble")]:
        monkeypatch.setattr(module, name, work)


def test_every_class_has_cases():
    assert {cls: len(cases) >= 5 for cls, cases in CLASSES.items()} == {cls: True for cls in CLASSES}


@pytest.mark.parametrize("case_id,main,argv,setup,needles", CASES, ids=[c[0] for c in CASES])
def test_hostile_file_or_command_is_refused_cleanly(workspace, capsys, request, case_id, main, argv, setup,
                                                    needles):
    if setup is not None:
        setup(workspace)
    if case_id.startswith(("outputs-", "inputs-", "files-run-out", "files-quality-grid")):
        request.getfixturevalue("no_work")
    before = snapshot(workspace)
    code = main([a.format(ws=workspace) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, (code, err)
    assert_one_line_error(code, err, *needles)
    assert snapshot(workspace) == before, "a file was created, replaced or left behind"


def test_a_png_output_in_capitals_is_written(engines_factory, tmp_path):
    out = tmp_path / "IMAGE.PNG"
    assert run_main(["--engines", str(engines_factory("d2c-tiny")), "--class", "2", *TINY, "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("closed", ["2>&-", ">&- 2>&-"])
def test_closed_standard_streams_still_write_the_image(engines_factory, tmp_path, closed):
    """With stderr (and stdout) closed, d2c-run still writes its image and exits 0."""
    out = tmp_path / "img.png"
    command = " ".join([str(Path(sys.executable).parent / "d2c-run"), "--engines", str(engines_factory("d2c-tiny")),
                        "--class", "4", *TINY[:-1], "--out", str(out), closed])  # not --quiet: progress bars too
    done = subprocess.run(["bash", "-c", command], timeout=300)
    assert done.returncode == 0 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
