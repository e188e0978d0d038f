"""Faults around the commands: interrupts, killed or concurrent exports, replaced models, symlinked outputs, and
sizes the official weights do not hold."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from d2c_export import generate
from d2c_export.cli import export_main, run_main
from d2c_export.manifest import MANIFEST
from reference.files import directory_lock
from tests.d2c_export.cli_helpers import assert_one_line_error, files_in, run_cli
from tests.reference.official_layouts import GPT_HEADS

TINY = ["--num-iter", "2", "--diffusion-steps", "3", "--quiet"]


def test_an_interrupt_is_one_line_and_writes_nothing(engines_factory, tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(generate, "generate_with", interrupted)
    out = tmp_path / "img.png"
    code, err = run_cli(run_main, ["--engines", engines_factory("d2c-tiny"), "--class", "1", *TINY, "--out", out],
                        capsys)
    assert code == 130 and "Traceback" not in err
    assert err.splitlines() == ["error: interrupted; nothing was written under a final name"]
    assert not out.exists()


def test_leftovers_of_a_killed_export_are_cleaned(tmp_path, capsys):
    out = tmp_path / "eng"
    out.mkdir()
    (out / ".vae.abc123.partial").mkdir()  # what publish_dir leaves when its process is killed
    (out / ".vae.abc123.partial" / "vae.onnx").write_bytes(b"half a graph")
    (out / ".manifest.json.xyz.partial").write_text("{")
    code, err = run_cli(export_main, ["onnx", "--config", "d2c-tiny", "--stage", "vae", "--out", out, "--quiet"],
                        capsys)
    assert code == 0, err
    assert sorted(files_in(out)) == [MANIFEST, "vae.onnx"]


def test_reexport_of_another_model_removes_the_old_models_files(engines_factory, tmp_path, capsys):
    out = tmp_path / "eng"
    shutil.copytree(engines_factory("d2c-tiny"), out)  # a copy of the session's d2c-tiny export
    assert "gpt.onnx" in files_in(out) and "cond.onnx" in files_in(out)
    assert run_cli(export_main, ["onnx", "--config", "d2c-tiny-none", "--out", out, "--quiet"], capsys)[0] == 0
    assert sorted(files_in(out)) == sorted([MANIFEST, "diffusion.onnx", "mar.onnx", "mar_cached.onnx", "mar_fresh.onnx",
                                            "vae.onnx"])  # plain MAR: no discrete stage
    assert json.loads((out / MANIFEST).read_text())["config"]["name"] == "d2c-tiny-none"


def test_a_concurrent_export_into_the_same_directory_is_refused(tmp_path, capsys):
    out = tmp_path / "eng"
    out.mkdir()
    with directory_lock(out, "a test's export"):  # another process's export holds the folder
        code, err = run_cli(export_main, ["onnx", "--config", "d2c-tiny", "--stage", "vae", "--out", out, "--quiet"],
                            capsys)
    assert_one_line_error(code, err, "another process is writing", str(out))
    assert files_in(out) == set()


def test_an_output_symlinked_to_a_file_writes_that_file(engines_factory, tmp_path, capsys):
    target = tmp_path / "real.png"
    target.write_bytes(b"old")
    link = tmp_path / "link.png"
    link.symlink_to(target)
    code, err = run_cli(run_main, ["--engines", engines_factory("d2c-tiny"), "--class", "1", *TINY, "--out", link],
                        capsys)
    assert code == 0, err
    assert link.is_symlink() and target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_with_no_sampling_flag_uses_the_models_settings(engines_factory, tmp_path, capsys):
    """The engines record their model's sampling settings: `d2c-run --engines DIR --class N` works and says which."""
    out = tmp_path / "img.png"
    code = run_main(["--engines", str(engines_factory("d2c-tiny")), "--class", "3", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 0, err
    assert out.exists()
    line = next(ln for ln in err.splitlines() if ln.startswith("sampling:"))
    assert "num_iter 16" in line and "recommended" in line


@pytest.mark.parametrize("name,tokens", [("c2i_B_256.pt", 256), ("c2i_L_384.pt", 576)])
def test_gpt_image_tokens_come_from_the_published_file_name(tmp_path, name, tokens):
    from reference.official import load_gpt
    from tests.reference.official import weights
    from tests.conftest import OFFICIAL
    path = tmp_path / name
    torch.save({"model": weights(OFFICIAL / "gpt_tiny_a")}, path)
    assert load_gpt(path, n_head=GPT_HEADS).args.block_size == tokens


def test_gpt_image_tokens_are_required_when_the_name_does_not_tell(tmp_path):
    from reference.checkpoint import CheckpointError
    from reference.official import load_gpt
    from tests.reference.official import weights
    from tests.conftest import OFFICIAL
    path = tmp_path / "my_gpt.pt"
    torch.save({"model": weights(OFFICIAL / "gpt_tiny_a")}, path)
    with pytest.raises(CheckpointError, match="number of image tokens is not in the weights"):
        load_gpt(path, n_head=GPT_HEADS)


def test_bench_of_a_preset_checks_its_settings_before_exporting(tmp_path, capsys):
    from d2c_export.cli import bench_main
    out = tmp_path / "bench"
    code, err = run_cli(bench_main, ["--config", "d2c-tiny", "--num-iter", "99", "--no-plot", "--out", out, "--quiet"],
                        capsys)
    assert_one_line_error(code, err, "--num-iter", "16 latent tokens")
    assert not out.exists() and "export" not in err
