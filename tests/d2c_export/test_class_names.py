"""Class names: `d2c-export onnx --class-names FILE` records them in the manifest (the demo checkpoint's export its
shapes and colours), a re-export of the same model keeps them, a manifest without them numbers the classes; a bad
names file is refused before any work, in one line naming the flag. And `--engines`, `--out`'s other name, is the
flag its errors name."""
from __future__ import annotations

import json
import os

import pytest

from d2c_export.class_names import default_class_names, read_class_names
from d2c_export.cli import export_main, run_main
from d2c_export.engines import Engines
from d2c_export.export.onnx import export_model
from d2c_export.manifest import MANIFEST, Manifest
from d2c_export.sources import ModelRequest, build_model
from tests.d2c_export.cli_helpers import assert_one_line_error, run_cli, snapshot

NAMES = ["tench", "goldfish", "great white shark", "tiger shark", "hammerhead", "electric ray", "stingray", "cock",
         "hen", "ostrich"]  # d2c-tiny has 10 classes
TINY = ["onnx", "--config", "d2c-tiny", "--quiet"]


def test_the_flag_records_names_that_a_reexport_at_another_max_batch_keeps(tmp_path, capsys):
    names = tmp_path / "names.txt"
    names.write_bytes("\r\n".join(NAMES).encode())  # Windows line ends, no newline after the last name
    out = tmp_path / "eng"
    code, err = run_cli(export_main, [*TINY, "--stage", "cond", "--class-names", names, "--out", out], capsys)
    assert code == 0, err
    assert json.loads((out / MANIFEST).read_text())["class_names"] == NAMES
    code, err = run_cli(export_main, [*TINY, "--stage", "vae", "--max-batch", "2", "--engines", out], capsys)
    assert code == 0, err
    engines = Engines.open(out)  # another max batch replaces the cond graph, not what the weights' classes are
    assert set(engines.manifest.stages) == {"vae"} and engines.max_batch == 2 and engines.class_names == NAMES


def test_a_json_list_is_read_as_it_is(tmp_path):
    path = tmp_path / "names.json"
    path.write_text(json.dumps([" padded ", "x" * 100]))
    assert read_class_names(path) == [" padded ", "x" * 100]


def test_a_manifest_without_names_numbers_the_classes(tiny_engines_copy):
    assert "class_names" not in json.loads((tiny_engines_copy / MANIFEST).read_text())
    assert Engines.open(tiny_engines_copy).class_names == [str(c) for c in range(10)]


def test_d2c_run_logs_the_names_of_the_classes_it_draws(tiny_engines_copy, tmp_path, capsys):
    manifest = Manifest.read(tiny_engines_copy / MANIFEST)
    manifest.class_names = NAMES
    manifest.save(tiny_engines_copy)
    code, err = run_cli(run_main, ["--engines", tiny_engines_copy, "--class", "3", "--class", "1", "--class", "3",
                                   "--num-iter", "2", "--diffusion-steps", "3", "--out", tmp_path / "x.png"], capsys)
    assert code == 0, err
    assert "classes: 3 (tiger shark), 1 (goldfish)\n" in err


def test_the_demo_export_records_the_shapes_and_colours_and_presets_record_none(tmp_path):
    from training.data import CLASSES
    model, source = build_model(ModelRequest())  # the demo checkpoint, as `d2c-export onnx` with no model flag
    export_model(model, tmp_path / "demo", source, stages=["cond"], progress=False)
    names = Engines.open(tmp_path / "demo").class_names
    assert names[0] == "red circle" and names[7] == "cyan cross" and len(set(names)) == len(CLASSES) == 10
    assert default_class_names({"random_init_seed": 0}) is None


def _fifo(path):
    os.mkfifo(path)


BAD_FILES = [  # (id, file name, content (bytes, or a function making the file), needles)
    ("too-few", "names.txt", "\n".join(NAMES[:3]).encode(), ["3 names for the model's 10 classes"]),
    ("blank-line", "names.txt", "\n".join(NAMES[:4] + [""] + NAMES[5:]).encode(), ["name 4 is empty"]),
    ("too-long", "names.txt", "\n".join(["x" * 101] + NAMES[1:]).encode(), ["name 0 has 101 characters"]),
    ("tab", "names.txt", "\n".join(["a\tb"] + NAMES[1:]).encode(), ["name 0", "control character"]),
    ("not-utf8", "names.txt", b"\xff\xfe" + b"\x00a" * 10, ["not UTF-8"]),
    ("json-object", "names.json", json.dumps({"0": "cat"}).encode(), ["not a JSON list", "an object"]),
    ("json-numbers", "names.json", json.dumps(list(range(10))).encode(), ["name 0 is not a string"]),
    ("fifo", "names.txt", _fifo, ["not a regular file"]),
]


@pytest.mark.parametrize("name,content,needles", [c[1:] for c in BAD_FILES], ids=[c[0] for c in BAD_FILES])
def test_a_bad_names_file_is_refused_before_any_export(tmp_path, capsys, name, content, needles):
    path = tmp_path / name
    content(path) if callable(content) else path.write_bytes(content)
    before = snapshot(tmp_path)
    code, err = run_cli(export_main, [*TINY, "--class-names", path, "--out", tmp_path / "eng"], capsys)
    assert_one_line_error(code, err, "--class-names", name, *needles)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("flag", ["--engines", "--out"])
def test_output_folder_errors_name_the_flag_typed(tmp_path, capsys, tiny_engines_copy, flag):
    (tmp_path / "afile").write_text("a file")
    code, err = run_cli(export_main, [*TINY, flag, tmp_path / "afile" / "eng"], capsys)
    assert_one_line_error(code, err, f"error: {flag}: cannot write")
    code, err = run_cli(export_main, [*TINY, flag, tiny_engines_copy, "--class-names", tiny_engines_copy / MANIFEST],
                        capsys)  # the export would replace an input
    assert_one_line_error(code, err, f"error: {flag}: writing", "would replace")


def test_out_and_engines_together_are_refused(tmp_path, capsys):
    code, err = run_cli(export_main, [*TINY, "--out", tmp_path / "a", "--engines", tmp_path / "b"], capsys)
    assert_one_line_error(code, err, "--engines is another name for --out")
