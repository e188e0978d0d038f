"""The native checkpoint: exact round trips, strict loading with clear errors, and atomic saves."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from reference import checkpoint as ckpt
from reference.checkpoint import (CheckpointError, checkpoint_sha256, load_checkpoint, load_state_strict,
                                  read_metadata, save_checkpoint)
from reference.model import D2C, get_config

PRESETS = ["d2c-tiny", "d2c-tiny-cross_attn", "d2c-tiny-none"]


def make_model(name: str = "d2c-tiny", seed: int = 0) -> D2C:
    torch.manual_seed(seed)
    return D2C(get_config(name))


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[D2C, Path]:
    model = make_model()
    path = save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "model.safetensors")
    return model, path


def rewrite(src: Path, dst: Path, edit) -> Path:
    """Copy a checkpoint with `edit(state)` applied to its tensors, keeping its metadata."""
    state = load_file(str(src))
    edit(state)
    save_file(state, str(dst), metadata=read_metadata(src))
    return dst


def error_of(path, **kw) -> str:
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, **kw)
    return str(info.value)


@pytest.mark.parametrize("name", PRESETS)
def test_round_trip_is_exact(tmp_path, name):
    model = make_model(name)
    path = save_checkpoint(model, tmp_path / "sub" / "m.safetensors")
    assert path.exists() and sorted(p.name for p in path.parent.iterdir()) == ["m.safetensors"]
    loaded = load_checkpoint(path)
    assert not loaded.training and all(not m.training for m in loaded.modules())
    assert loaded.config.to_dict() == model.config.to_dict()
    want, got = model.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys()
    for key, value in want.items():
        assert got[key].dtype == value.dtype and torch.equal(got[key], value), key
    meta = read_metadata(path)
    assert json.loads(meta["d2c_config"]) == json.loads(json.dumps(model.config.to_dict()))
    assert meta["format_version"] == str(ckpt.FORMAT_VERSION)


def test_loaded_model_computes_the_same(saved):
    model, path = saved
    loaded = load_checkpoint(path, config=get_config("d2c-tiny"))
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded.mar.condition(ids), model.mar.condition(ids), rtol=0, atol=0)


def test_sha256_is_the_file_hash_and_saves_are_reproducible(saved, tmp_path):
    model, path = saved
    assert checkpoint_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    again = save_checkpoint(model, tmp_path / "again.safetensors")
    assert checkpoint_sha256(again) == checkpoint_sha256(path)
    with pytest.raises(FileNotFoundError):
        checkpoint_sha256(tmp_path / "nope.safetensors")


def test_writer_output_is_standard_safetensors(tmp_path):
    tensors = {name: torch.arange(6).reshape(2, 3).to(dtype) for name, dtype in
               [("f64", torch.float64), ("bf16", torch.bfloat16), ("f16", torch.float16), ("i64", torch.int64),
                ("u8", torch.uint8), ("b", torch.bool)]}
    tensors.update(scalar=torch.tensor(3.5), empty=torch.zeros(0, 4))
    path = tmp_path / "t.safetensors"
    ckpt._write_safetensors(tensors, path, {"b": "2", "a": "1"})
    back = load_file(str(path))
    assert back.keys() == tensors.keys()
    for key, value in tensors.items():
        assert back[key].dtype == value.dtype and torch.equal(back[key], value), key
    assert read_metadata(path) == {"a": "1", "b": "2"}


def test_removed_key(saved, tmp_path):
    _, src = saved
    path = rewrite(src, tmp_path / "f.safetensors", lambda s: s.pop("mar.fake_latent"))
    msg = error_of(path)
    assert str(path) in msg and "1 missing" in msg and "mar.fake_latent (expected (1, 32))" in msg
    assert "unexpected" not in msg


def test_renamed_key(saved, tmp_path):
    _, src = saved
    path = rewrite(src, tmp_path / "f.safetensors",
                   lambda s: s.__setitem__("mar.z_proj.weight_renamed", s.pop("mar.z_proj.weight")))
    msg = error_of(path)
    assert "1 missing" in msg and "mar.z_proj.weight (expected" in msg
    assert "1 unexpected" in msg and "mar.z_proj.weight_renamed (found" in msg


def test_reshaped_tensor(saved, tmp_path):
    _, src = saved
    path = rewrite(src, tmp_path / "f.safetensors",
                   lambda s: s.__setitem__("mar.z_proj.weight", s["mar.z_proj.weight"].t().contiguous()))
    msg = error_of(path)
    assert "1 mis-shaped" in msg and "mar.z_proj.weight: expected (32, 16), found (16, 32)" in msg


def test_many_mismatches_are_capped_with_counts(tmp_path):
    path = save_checkpoint(make_model("d2c-tiny-none"), tmp_path / "none.safetensors")
    msg = error_of(path, config=get_config("d2c-tiny"))  # lacks the GPT and the condition network
    n_missing = len(D2C(get_config("d2c-tiny")).state_dict()) - len(load_file(str(path)))
    assert f"{n_missing} missing" in msg and f"... and {n_missing - ckpt.MAX_LISTED} more" in msg
    listed = [line for line in msg.splitlines() if line.startswith("    ") and "(expected" in line]
    assert len(listed) == ckpt.MAX_LISTED


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated_file(saved, tmp_path, keep):
    _, src = saved
    data = src.read_bytes()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[: int(len(data) * keep)])
    msg = error_of(path)
    assert "truncated" in msg and str(path) in msg and "\n" not in msg


def test_trailing_bytes(saved, tmp_path):
    _, src = saved
    path = tmp_path / "long.safetensors"
    path.write_bytes(src.read_bytes() + b"\0" * 8)
    assert "trailing bytes" in error_of(path)


@pytest.mark.parametrize("content", [b"", b"abc", b"hello, this is not a checkpoint" * 10,
                                     b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!", json.dumps([1]).encode()])
def test_not_a_safetensors_file(tmp_path, content):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(content)
    msg = error_of(path)
    assert str(path) in msg and ("not a safetensors file" in msg or "truncated" in msg) and "\n" not in msg


def test_safetensors_without_config(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    assert "d2c_config" in error_of(path)
    save_file({"w": torch.zeros(2)}, str(path), metadata={"d2c_config": "{broken"})
    assert "invalid d2c_config" in error_of(path)
    save_file({"w": torch.zeros(2)}, str(path), metadata={"d2c_config": "{}", "format_version": "99"})
    assert "newer" in error_of(path)


def test_missing_path(tmp_path):
    path = tmp_path / "missing" / "model.safetensors"
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert isinstance(info.value, FileNotFoundError) and str(path) in str(info.value)
    with pytest.raises(CheckpointError, match="not a regular file"):
        load_checkpoint(tmp_path)


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    model = make_model("d2c-tiny-none")

    def broken_writer(tensors, path, metadata):
        Path(path).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "_write_safetensors", broken_writer)
    target = tmp_path / "m.safetensors"
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(model, target)
    assert list(tmp_path.iterdir()) == []


def test_failed_save_keeps_the_previous_file(saved, tmp_path, monkeypatch):
    model, src = saved
    target = tmp_path / "m.safetensors"
    target.write_bytes(src.read_bytes())

    def broken_writer(tensors, path, metadata):
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt, "_write_safetensors", broken_writer)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(model, target)
    assert target.read_bytes() == src.read_bytes() and [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_load_state_strict_on_any_module():
    lin = nn.Linear(3, 2)
    good = {k: torch.ones_like(v) for k, v in lin.state_dict().items()}
    load_state_strict(lin, good, "unit")
    assert torch.equal(lin.weight, torch.ones(2, 3))
    with pytest.raises(CheckpointError, match=r"(?s)unit: .*1 missing.*bias \(expected \(2\)\)"):
        load_state_strict(lin, {"weight": torch.zeros(2, 3)}, "unit")
    assert torch.equal(lin.weight, torch.ones(2, 3))  # nothing loaded on failure
