"""Official LlamaGen / MAR files through the toolchain: ONNX parity with the official recordings, convert, d2c-run."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from d2c_export.backends.ort import CPU, OrtSession
from d2c_export.cli import export_main, run_main
from d2c_export.engines import Engines
from d2c_export.manifest import MANIFEST, Manifest
from reference.checkpoint import load_checkpoint
from reference.diffusion import make_tables
from reference.files import sha256_file
from reference.gpt import cache_feeds, write_cache
from reference.model import PRESETS, D2C
from reference.official import assemble
from tests.conftest import OFFICIAL
from tests.d2c_export.cli_helpers import assert_one_line_error, files_in, run_cli
from tests.reference.official import arrays, draw_records, mask_to_kept, weights
from tests.reference.official_layouts import GPT_HEADS, MAR_HEADS, MAR_PATCH, shifted, write_official_files

TOL = 1e-5


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_official_files(tmp_path_factory.mktemp("official"))


@pytest.fixture(scope="module")
def mar_engines(files, tmp_path_factory):
    """Plain MAR exported straight from the official-format files (MAR + KL VAE)."""
    out = tmp_path_factory.mktemp("mar_engines")
    assert export_main(["onnx", "--checkpoint", str(files["mar"]), "--vae", str(files["vae"]),
                        "--mar-heads", str(MAR_HEADS), "--mar-patch-size", str(MAR_PATCH), "--out", str(out), "--max-batch", "4"]) == 0
    return out


def _run(engines, stage: str, **feeds) -> np.ndarray:
    path = Engines.open(engines).file(stage, "onnx-fp32")
    outputs = OrtSession(path, [CPU]).run({k: np.asarray(v) for k, v in feeds.items()})
    return next(iter(outputs.values()))


def _close(got: np.ndarray, want: torch.Tensor) -> None:
    torch.testing.assert_close(torch.from_numpy(got), want, atol=TOL, rtol=0)


def test_manifest_records_every_input_file(mar_engines, files):
    manifest = Manifest.read(mar_engines / MANIFEST)
    assert manifest.source["official"] == {
        "stage2": {"path": str(files["mar"].resolve()), "sha256": sha256_file(files["mar"])},
        "vae": {"path": str(files["vae"].resolve()), "sha256": sha256_file(files["vae"])}}
    assert manifest.source["ema"] is True and manifest.source["mar_heads"] == MAR_HEADS
    assert manifest.source["mar_patch_size"] == MAR_PATCH
    assert manifest.d2c_config.gpt is None
    assert set(manifest.stages) == {"mar", "mar_cached", "mar_fresh", "diffusion", "vae"}  # no discrete stage


def test_onnx_mar_stage_matches_official_decoder(mar_engines):
    io = arrays(OFFICIAL / "mar_tiny_a" / "io.npz")
    kept, every = mask_to_kept(io["in_mask"]), torch.arange(16).expand(3, -1)
    _close(_run(mar_engines, "mar", tokens=io["in_x"], kept=kept, pred=every, labels=io["in_labels"]),
           io["out_dec_out"])
    null = torch.full((3,), 10)  # MAR's fake_latent rows, after the conditional ones
    _close(_run(mar_engines, "mar", tokens=torch.cat([io["in_x"]] * 2), kept=torch.cat([kept] * 2),
                pred=torch.cat([every] * 2), labels=torch.cat([io["in_labels"], null])), io["out_cfg_dec_out"])


def test_onnx_diffusion_stage_matches_official_p_sample(mar_engines):
    io, fx = arrays(OFFICIAL / "mar_tiny_a" / "io.npz"), OFFICIAL / "mar_tiny_a"
    tables = make_tables(10)  # the recording's num_sampling_steps
    for index, tag in ((5, "t"), (0, "t0")):
        (_, noise), = draw_records(fx, f"psample_{tag}")
        got = _run(mar_engines, "diffusion", x=io["in_ps_x"][:3], t=torch.tensor([tables.model_timestep(index)]),
                   z=io["in_sample_z"], noise=noise[:3], cfg=torch.tensor([2.0]), temperature=torch.tensor([0.9]),
                   coefs=tables.coefficients(index))
        _close(got, io[f"out_psample_{tag}_sample"][:3])


def test_onnx_vae_stage_matches_official_decode(mar_engines):
    io = arrays(OFFICIAL / "vae_tiny_a" / "io.npz")
    _close(_run(mar_engines, "vae", latents=io["in_z"]), io["out_decode"])


def test_onnx_gpt_stage_of_llamagen_file_matches_official(files, tmp_path):
    """The official GPT as stage 1 of a D2C whose stage 2 (random Q-Former MAR) comes in MAR's layout."""
    torch.manual_seed(0)
    torch.save({"model": D2C(PRESETS["d2c-tiny"]).mar.state_dict()}, tmp_path / "stage2.pth")
    out = tmp_path / "engines"
    assert export_main(["onnx", "--stage", "gpt", "--gpt", str(files["gpt"]), "--stage2", str(tmp_path / "stage2.pth"),
                        "--vae", str(files["vae"]), "--gpt-heads", str(GPT_HEADS), "--mar-patch-size", "2",
                        "--out", str(out)]) == 0  # d2c-tiny's MAR: patch 2
    manifest = Manifest.read(out / MANIFEST)
    assert set(manifest.source["official"]) == {"gpt", "stage2", "vae"}
    io = arrays(OFFICIAL / "gpt_tiny_a" / "io.npz")
    session = OrtSession(Engines.open(out).file("gpt", "onnx-fp32"), [CPU])
    shape = (2, 6, 4, 17, 16)  # (layers, rows, heads, 1 + 16 tokens, head_dim)
    k, v = torch.zeros(shape), torch.zeros(shape)
    steps = [("prefill", io["out_kv_cond_combined"][:, None], torch.tensor([0]))]
    steps += [(f"decode{s}", io[f"out_kv_decode{s}_input"], io[f"out_kv_decode{s}_input_pos"]) for s in range(3)]
    for name, ids, pos in steps:
        caches = {name: c.numpy() for name, c in cache_feeds(k, v).items()}
        got = session.run({"ids": ids.long().numpy(), "input_pos": pos.long().numpy(), **caches})
        _close(got["logits"], io[f"out_kv_{name}_logits"])
        write_cache(k, torch.from_numpy(got["k_new"]), pos.long())
        write_cache(v, torch.from_numpy(got["v_new"]), pos.long())


def test_d2c_run_plain_mar_end_to_end(mar_engines, tmp_path):
    pngs = {backend: tmp_path / f"{backend}.png" for backend in ("ort", "torch")}
    for backend, png in pngs.items():
        assert run_main(["--engines", str(mar_engines), "--class", "3", "--class", "7", "--num-iter", "2",
                         "--diffusion-steps", "3", "--backend", backend, "--out", str(png), "--quiet"]) == 0
    ort, ref = (np.asarray(Image.open(p), dtype=np.int16) for p in pngs.values())
    assert ort.shape == (16, 32, 3)  # two 16 px images side by side
    assert np.abs(ort - ref).max() <= 1  # the torch backend rebuilt the same model from the recorded files
    assert ort.std() > 0


def test_convert_writes_the_native_checkpoint(files, tmp_path):
    out = tmp_path / "mar.safetensors"
    args = ["convert", "--out", str(out), "--checkpoint", str(files["mar"]), "--vae", str(files["vae"]),
            "--mar-heads", str(MAR_HEADS), "--mar-patch-size", str(MAR_PATCH)]
    assert export_main(args) == 0
    native, recorded = load_checkpoint(out), weights(OFFICIAL / "mar_tiny_a")
    assert native.config.to_dict() == assemble(files["mar"], vae=files["vae"], mar_heads=MAR_HEADS,
                                                mar_patch_size=MAR_PATCH).config.to_dict()
    state = native.mar.state_dict()
    assert state.keys() == recorded.keys()
    assert all(torch.equal(state[k], v) for k, v in recorded.items())  # the EMA entry by default
    assert export_main(args + ["--no-ema"]) == 0
    state = load_checkpoint(out).mar.state_dict()
    assert all(torch.equal(state[k], v) for k, v in shifted(recorded).items())


def test_changed_or_missing_input_file_is_refused(files, mar_engines, tmp_path, capsys):
    copy = tmp_path / "mar.pth"
    shutil.copy(files["mar"], copy)
    engines = tmp_path / "engines"
    engines.mkdir()
    manifest = json.loads((mar_engines / MANIFEST).read_text())
    manifest["source"]["official"]["stage2"]["path"] = str(copy)
    (engines / MANIFEST).write_text(json.dumps(manifest))
    argv = ["--engines", str(engines), "--class", "1", "--backend", "torch", "--out", str(tmp_path / "x.png")]
    torch.save({"model": weights(OFFICIAL / "mar_tiny_a")}, copy)
    code, err = run_cli(run_main, argv, capsys)
    assert_one_line_error(code, err, "changed since export", f"d2c-export onnx --stage all --checkpoint {copy}",
                          "--mar-heads 4 --mar-patch-size 2", f"--out {engines}")
    copy.unlink()
    code, err = run_cli(run_main, argv, capsys)
    assert_one_line_error(code, err, "missing")
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("argv,needles", [
    (["--checkpoint", "{mar}", "--mar-heads", "4"], ["holds no VAE", "--vae"]),
    (["--checkpoint", "{gpt}", "--vae", "{vae}"], ["not a stage-2 checkpoint", "--gpt"]),
    (["--checkpoint", "{mar}", "--vae", "{vae}"], ["not an official size", "--mar-heads"]),
    (["--checkpoint", "{mar}", "--vae", "{vae}", "--mar-heads", "4"],
     ["at patch size 1 (MAR's published patch size", "need a VAE with 16 latent channels", "--mar-patch-size N"]),
    (["--config", "d2c-tiny", "--vae", "{vae}"], ["--vae go with --checkpoint"]),
])
def test_export_errors_are_one_line_and_write_nothing(files, tmp_path, capsys, argv, needles, monkeypatch):
    from reference import official_sizes  # the tiny MAR's (64, 2) must not match a preset's heads
    monkeypatch.setattr(official_sizes, "MAR_HEADS", {k: v for k, v in official_sizes.MAR_HEADS.items()
                                                      if k != (64, 2)})
    out = tmp_path / "engines"
    argv = [a.format(**{k: str(p) for k, p in files.items()}) for a in argv]
    code, err = run_cli(export_main, ["onnx", *argv, "--out", str(out)], capsys)
    assert_one_line_error(code, err, *needles)
    assert files_in(out) == set()
