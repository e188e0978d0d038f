"""Bad input gets one clear line, a non-zero exit, and writes nothing."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from safetensors import safe_open

from d2c_export.cli import export_main, run_main
from d2c_export.manifest import FORMAT_VERSION, MANIFEST
from reference.checkpoint import save_checkpoint
from reference.files import sha256_file
from reference.model import D2C, get_config
from tests.d2c_export.cli_helpers import assert_one_line_error, files_in, run_cli


def test_class_out_of_range(tiny_engines_copy, tmp_path, capsys):
    out = tmp_path / "img.png"
    code, err = run_cli(run_main, ["--engines", str(tiny_engines_copy), "--class", "10", "--out", str(out),
                                   "--quiet"], capsys)
    assert_one_line_error(code, err, "--class", "class 10", "0..9", "--config d2c-b", "official weights")
    assert not out.exists()


def test_batch_above_exported_profile(tiny_engines_copy, tmp_path, capsys):
    out = tmp_path / "img.png"
    code, err = run_cli(run_main, ["--engines", str(tiny_engines_copy), "--class", "1", "--num-images", "5",
                                   "--out", str(out), "--quiet"], capsys)
    assert_one_line_error(code, err, "max batch 4")
    assert not out.exists()


def test_missing_engines_directory(tmp_path, capsys):
    code, err = run_cli(run_main, ["--engines", str(tmp_path / "nope"), "--class", "1",
                                   "--out", str(tmp_path / "x.png")], capsys)
    assert_one_line_error(code, err, "does not exist", "d2c-export onnx")
    assert files_in(tmp_path) == set()


def test_manifest_hash_mismatch(tiny_engines_copy, tmp_path, capsys):
    graph = tiny_engines_copy / "mar.onnx"
    data = bytearray(graph.read_bytes())
    data[-10] ^= 0xFF
    graph.write_bytes(bytes(data))
    out = tmp_path / "img.png"
    code, err = run_cli(run_main, ["--engines", str(tiny_engines_copy), "--class", "1", "--out", str(out),
                                   "--backend", "ort", "--quiet"], capsys)
    assert_one_line_error(code, err, "mar.onnx", "sha256", "d2c-export onnx")
    assert not out.exists()


def test_engines_of_an_older_format_are_refused(tiny_engines_copy, tmp_path, capsys):
    """Graphs exported under an older stage contract (e.g. the gpt's whole-cache inputs) are not fed new inputs."""
    manifest = json.loads((tiny_engines_copy / MANIFEST).read_text())
    manifest["format_version"] = FORMAT_VERSION - 1
    (tiny_engines_copy / MANIFEST).write_text(json.dumps(manifest))
    out = tmp_path / "img.png"
    code, err = run_cli(run_main, ["--engines", str(tiny_engines_copy), "--class", "1", "--out", str(out),
                                   "--quiet"], capsys)
    assert_one_line_error(code, err, f"format version {FORMAT_VERSION - 1}", "d2c-export onnx --stage all")
    assert not out.exists()


def test_truncated_onnx_file(tiny_engines_copy, tmp_path, capsys):
    graph = tiny_engines_copy / "vae.onnx"
    graph.write_bytes(graph.read_bytes()[:1000])
    out = tmp_path / "img.png"
    code, err = run_cli(run_main, ["--engines", str(tiny_engines_copy), "--class", "1", "--out", str(out),
                                   "--quiet"], capsys)
    assert_one_line_error(code, err, "vae.onnx")  # caught by the hash before loading
    # Even with a manifest rewritten to the truncated file's hash, loading fails with one clear line.
    manifest = json.loads((tiny_engines_copy / MANIFEST).read_text())
    manifest["stages"]["vae"]["onnx-fp32"]["files"]["vae.onnx"] = sha256_file(graph)
    (tiny_engines_copy / MANIFEST).write_text(json.dumps(manifest))
    code, err = run_cli(run_main, ["--engines", str(tiny_engines_copy), "--class", "1", "--out", str(out),
                                   "--quiet"], capsys)
    assert_one_line_error(code, err, "cannot load", "vae.onnx")
    assert not out.exists()


@pytest.fixture()
def tiny_checkpoint(tmp_path) -> Path:
    torch.manual_seed(0)
    return save_checkpoint(D2C(get_config("d2c-tiny")), tmp_path / "tiny.safetensors")


def _rewrite(path: Path, edit) -> Path:
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    state = load_file(str(path))
    edit(state)
    save_file(state, str(path), metadata=metadata)
    return path


@pytest.mark.parametrize("damage,needle", [
    (lambda s: s.pop("mar.z_proj.weight"), "mar.z_proj.weight"),
    (lambda s: s.__setitem__("mar.z_proj.weight", torch.zeros(3, 3)), "mar.z_proj.weight"),
])
def test_checkpoint_with_missing_or_misshaped_keys(tiny_checkpoint, tmp_path, capsys, damage, needle):
    _rewrite(tiny_checkpoint, damage)
    out = tmp_path / "engines"
    code, err = run_cli(export_main, ["onnx", "--checkpoint", str(tiny_checkpoint), "--out", str(out)], capsys)
    assert_one_line_error(code, err, needle)
    assert files_in(out) == set()


def test_export_from_checkpoint_records_its_hash(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "engines"
    code, _ = run_cli(export_main, ["onnx", "--stage", "vae", "--checkpoint", str(tiny_checkpoint),
                                    "--out", str(out)], capsys)
    assert code == 0
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["source"]["sha256"] == sha256_file(tiny_checkpoint)
    assert sorted(files_in(out)) == [MANIFEST, "vae.onnx"], "no temporary files left behind"


def test_a_bug_is_a_traceback_not_a_user_error(tiny_engines_copy, tmp_path, monkeypatch):
    """Only the user's errors are one line: an internal KeyError propagates (the process prints its traceback)."""
    import d2c_export.generate

    def broken(*args, **kwargs):
        return {}["images"]

    monkeypatch.setattr(d2c_export.generate, "generate_images", broken)
    with pytest.raises(KeyError, match="images"):
        run_main(["--engines", str(tiny_engines_copy), "--class", "1", "--out", str(tmp_path / "x.png"), "--quiet"])


def test_unknown_backend_is_refused_by_the_parser(tiny_engines_copy, tmp_path, capsys):
    out = tmp_path / "img.png"
    code, err = run_cli(run_main, ["--engines", tiny_engines_copy, "--class", "1", "--backend", "tensorflow",
                                   "--out", out], capsys)
    assert_one_line_error(code, err, "--backend", "tensorflow")
    assert code == 2 and not out.exists()
