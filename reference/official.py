"""Official LlamaGen and MAR checkpoints: format detection, explicit key mapping, strict loading into D2C.

Files as published (torch pickles, read with `torch.load(weights_only=True)`), format: weights entry, EMA entry:
- `llamagen-gpt` (c2i_B_256.pt, ...): "model" (DDP), "module" (DeepSpeed), "state_dict", or the bare state
  dict (FSDP), in sample_c2i.py's order; EMA: "ema" (train_c2i.py --ema; sample_c2i.py itself reads
  "model", which ema=False matches).
- `mar` (mar_{base,large,huge}/checkpoint-last.pth): "model"; EMA: "model_ema" (util/misc.py save_model:
  the EMA parameters in a full state dict).
- `mar-vae` (kl16.ckpt): "model" (models/vae.py init_from_ckpt); no EMA.
- `native`: our .safetensors with the config in its metadata (reference/checkpoint.py).

A D2C stage 2 may also come in MAR's layout: MAR's keys plus the fusion weights (`condition.*`,
`*.cross_attn.*`). A .safetensors file without our config is read as a bare state dict of official keys.
LlamaGen's VQ tokenizer is out of scope (D2C decodes with the KL VAE), as are text-conditional GPTs.

Key mapping. The reference keeps the official names, so there is no rename table; in order:
  1. entry: the EMA entry when `ema=True` and the file has one, else the weights entry;
  2. `_orig_mod` path components are removed (torch.compile's wrapper, as in LlamaGen's train_c2i.py);
  3. a leading "module." is stripped when every key has it (the state_dict of a DDP wrapper);
  4. keys that are not weights of the network are dropped, per format (`DROPPED`):
     llamagen-gpt `freqs_cis` (older LlamaGen kept the RoPE table as a buffer; here it is computed
     from the sizes, checked equal to the stored one, and tells block_size and heads),
     llamagen-gpt `layers.N.attention.kv_cache.{k,v}_cache` (buffers made by setup_caches(); the
     cache is an input of the gpt stage here), mar-vae `loss.*` (the LDM-style training loss: LPIPS,
     discriminator, logvar, which the official loader's strict=False drops);
  5. every other key loads strictly, unchanged, into the `gpt`, `mar` or `vae` part of a D2C
     (`D2C.state_dict()` keys are these with the "gpt.", "mar.", "vae." prefixes).
Sizes come from the tensor shapes (reference/official_sizes.py).
"""
from __future__ import annotations

import argparse
import logging
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from reference.checkpoint import (CONFIG_KEY, CheckpointError, CheckpointNotFoundError, load_checkpoint,
                                  load_state_strict, read_metadata)
from reference.errors import Setting
from reference.gpt import GPT
from reference.mar import MAR, Fusion
from reference.model import D2C, PRESETS, D2CConfig
from reference.official_sizes import fit_args, gpt_args_from_state, mar_args_from_state, vae_args_from_state
from reference.vae import AutoencoderKL

__all__ = ["Format", "Weights", "read_weights", "weights_from_object", "detect_format", "is_native",
           "load_gpt", "load_mar", "load_vae", "assemble"]

log = logging.getLogger(__name__)


class Format(str, Enum):
    NATIVE = "native"
    GPT = "llamagen-gpt"
    MAR = "mar"
    VAE = "mar-vae"


WEIGHT_ENTRIES = ("model", "module", "state_dict")  # LlamaGen sample_c2i.py's order; MAR and its VAE use "model"
EMA_ENTRY = {Format.GPT: "ema", Format.MAR: "model_ema"}
MARKERS = {  # keys that identify a format (after rules 2-3); the format with the most of them present wins
    Format.GPT: ("tok_embeddings.weight", "cls_embedding.embedding_table.weight", "layers.0.attention.wqkv.weight",
                 "output.weight"),
    Format.MAR: ("class_emb.weight", "fake_latent", "z_proj.weight", "diffloss.net.input_proj.weight"),
    Format.VAE: ("encoder.conv_in.weight", "decoder.conv_out.weight", "quant_conv.weight", "post_quant_conv.weight"),
}
OUT_OF_SCOPE = {
    "quantize.embedding.weight": "a LlamaGen VQ tokenizer, which is out of scope: D2C decodes with the KL VAE "
                                 "(the VQ tokenizer only makes stage-1 training data)",
    "cls_embedding.cap_proj.fc1.weight": "a text-conditional (t2i) LlamaGen GPT; only class-conditional (c2i) "
                                         "checkpoints are supported",
}
ROPE_KEY = "freqs_cis"
DROPPED = {Format.GPT: re.compile(r"freqs_cis$|layers\.\d+\.attention\.kv_cache\.[kv]_cache$"),
           Format.VAE: re.compile(r"loss\.")}
COMPILE_COMPONENT = "_orig_mod"
DDP_PREFIX = "module."
SAFE_GLOBALS = [argparse.Namespace]  # the training "args" that MAR and LlamaGen save beside the weights


@dataclass
class Weights:
    """One file's weights for one part: the mapped state dict (official keys), its format and origin."""

    format: Format
    state: dict[str, Tensor]
    source: str  # "path [entry]", for messages
    path: Path | None = None
    dropped: dict[str, Tensor] = field(default_factory=dict)  # keys removed by rule 4
    native: D2C | None = None  # the model of a native checkpoint


# -- reading -------------------------------------------------------------------------------------------
def _is_state(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(k, str) and isinstance(v, Tensor)
                                                       for k, v in obj.items())


def _unwrap(state: dict[str, Tensor], source: str) -> dict[str, Tensor]:
    """Rules 2 and 3: torch.compile's `_orig_mod` components, then a DDP "module." prefix on every key."""
    if any(COMPILE_COMPONENT in k.split(".") for k in state):
        mapped = {".".join(p for p in k.split(".") if p != COMPILE_COMPONENT): v for k, v in state.items()}
        if len(mapped) != len(state):
            raise CheckpointError(f"{source}: keys collide once torch.compile's '{COMPILE_COMPONENT}.' is removed")
        log.info("%s: removed torch.compile's '%s.' from the keys", source, COMPILE_COMPONENT)
        state = mapped
    if all(k.startswith(DDP_PREFIX) for k in state):
        log.info("%s: stripped the DDP prefix '%s'", source, DDP_PREFIX)
        state = {k[len(DDP_PREFIX):]: v for k, v in state.items()}
    return state


def detect_format(state: dict[str, Tensor], source: str) -> Format:
    """The format whose identifying keys (`MARKERS`) the state dict holds most of."""
    for key, what in OUT_OF_SCOPE.items():
        if key in state:
            raise CheckpointError(f"{source}: {what}")
    scores = {fmt: sum(k in state for k in keys) for fmt, keys in MARKERS.items()}
    best = max(scores.values())
    winners = [fmt for fmt, score in scores.items() if score == best]
    if best == 0 or len(winners) > 1:
        first = ", ".join(list(state)[:4])
        expected = "; ".join(f"{fmt.value}: {keys[0]}" for fmt, keys in MARKERS.items())
        raise CheckpointError(f"{source}: not a LlamaGen GPT, MAR or MAR VAE state dict (its keys start {first}); "
                              f"expected keys such as {expected}")
    return winners[0]


def _drop(state: dict[str, Tensor], fmt: Format, source: str) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Rule 4: the keys of `DROPPED[fmt]` go aside."""
    pattern = DROPPED.get(fmt)
    if pattern is None:
        return state, {}
    dropped = {k: v for k, v in state.items() if pattern.match(k)}
    if dropped:
        log.info("%s: dropped %d non-weight key(s) (%s%s)", source, len(dropped), ", ".join(list(dropped)[:3]),
                 ", ..." if len(dropped) > 3 else "")
    return {k: v for k, v in state.items() if k not in dropped}, dropped


def weights_from_object(obj, source: str, ema: bool = True) -> Weights:
    """Rules 1-4 on what `torch.load` returned (or a bare state dict): the part's weights, mapped."""
    if _is_state(obj):
        name, state = "state dict", obj
    elif isinstance(obj, dict):
        name = next((n for n in WEIGHT_ENTRIES if _is_state(obj.get(n))), None)
        if name is None:
            have = ", ".join(repr(k) for k in list(obj)[:8]) or "nothing"
            raise CheckpointError(f"{source}: no weights: expected a state dict, or one under "
                                  f"{', '.join(map(repr, WEIGHT_ENTRIES))} (the file has {have})")
        state = obj[name]
    else:
        raise CheckpointError(f"{source}: holds a {type(obj).__name__}, not a state dict or a dict of entries")
    state = _unwrap(state, source)
    fmt = detect_format(state, source)
    ema_name = EMA_ENTRY.get(fmt)
    if ema and ema_name and isinstance(obj, dict) and obj.get(ema_name) is not None:
        if not _is_state(obj[ema_name]):
            raise CheckpointError(f"{source}: entry {ema_name!r} is not a state dict; load without EMA (",
                                  Setting("ema", False), ")")
        name, state = ema_name, _unwrap(obj[ema_name], source)
        log.info("%s: EMA weights (entry %r)", source, ema_name)
    elif ema and ema_name:
        log.info("%s: no EMA weights (entry %r); using %r", source, ema_name, name)
    state, dropped = _drop(state, fmt, source)
    return Weights(fmt, state, f"{source} [{name}]", dropped=dropped)


def _is_safetensors(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"  # 8-byte header length, then the JSON header


def is_native(path: str | Path) -> bool:
    """Whether `path` is our native checkpoint (a .safetensors file with the config in its metadata)."""
    path = Path(path)
    return path.is_file() and _is_safetensors(path) and CONFIG_KEY in read_metadata(path)


def _line(exc: Exception, marker: str = "") -> str:
    """The line of an exception's message that says what went wrong (the one with `marker`, else the first)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return next((line for line in lines if marker and marker in line), lines[0] if lines else type(exc).__name__)


def _torch_load(path: Path):
    unreadable = f"{path}: not a readable PyTorch checkpoint (truncated, corrupt or another format)"
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "unsupported global" not in text.lower():
            lines = [ln.strip() for ln in text.splitlines() if ln.strip() and "weights_only" not in ln
                     and not ln.strip().startswith(("Weights only load failed", "Check the documentation"))]
            raise CheckpointError(f"{unreadable}: {lines[0] if lines else 'not a pickle'}") from None
        found = next((line.strip() for line in text.splitlines() if "unsupported global" in line.lower()), "")
        raise CheckpointError(
            f"{path} holds Python code or objects besides tensors ({found}); it was not run. Only weights are "
            "loaded; if you trust the file, write its weights alone with torch.save and load that file") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, zipfile.BadZipFile, SafetensorError) as exc:
        raise CheckpointError(f"{unreadable}: {_line(exc) if not isinstance(exc, KeyError) else 'unknown format'}") \
            from None


def read_weights(path: str | Path, ema: bool = True) -> Weights:
    """Read one file of any accepted format; a native checkpoint is loaded whole (`Weights.native`)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointNotFoundError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a regular file")
    if _is_safetensors(path):
        if CONFIG_KEY in read_metadata(path):
            return Weights(Format.NATIVE, {}, str(path), path, native=load_checkpoint(path))
        weights = weights_from_object(load_file(str(path)), str(path), ema)
    else:
        weights = weights_from_object(_torch_load(path), str(path), ema)
    weights.path = path
    log.info("%s: %s weights, %d tensors", weights.source, weights.format.value, len(weights.state))
    return weights


# -- loading -------------------------------------------------------------------------------------------
def _as_weights(item: str | Path | Weights, ema: bool) -> Weights:
    return item if isinstance(item, Weights) else read_weights(item, ema)


def _expect(weights: Weights, fmt: Format, role: str, setting: str | None = None) -> None:
    if weights.format is not fmt:
        given_as = (f"{role} (", Setting(setting, "PATH"), ")") if setting else (role,)
        raise CheckpointError(f"{weights.source}: a {weights.format.value} checkpoint was given as ", *given_as,
                              f", which takes a {fmt.value} checkpoint")


def _device(*states: dict[str, Tensor]) -> str:
    """Parts are built where the weights are: meta tensors (shape-only checks) build on meta."""
    return "meta" if any(v.is_meta for s in states for v in s.values()) else "cpu"


def _built(cls: type[nn.Module], args, state: dict[str, Tensor], source: str) -> nn.Module:
    with torch.device(_device(state)):
        module = cls(args)
    load_state_strict(module, state, source)
    return module.eval()


def _gpt_args(weights: Weights, n_head: int | None, block_size: int | None):
    return fit_args("gpt", lambda: gpt_args_from_state(weights.state, weights.source, n_head, block_size,
                                                       weights.dropped.get(ROPE_KEY)),
                    weights.state, weights.source)


def _vae_args(weights: Weights):
    return fit_args("vae", lambda: vae_args_from_state(weights.state, weights.source), weights.state, weights.source)


def load_gpt(gpt: str | Path | Weights, ema: bool = True, n_head: int | None = None,
             block_size: int | None = None) -> GPT:
    """A LlamaGen c2i GPT from its official file (sizes from the shapes; see `gpt_args_from_state`)."""
    weights = _as_weights(gpt, ema)
    _expect(weights, Format.GPT, "the GPT")
    return _built(GPT, _gpt_args(weights, n_head, block_size), weights.state, weights.source)


def load_vae(vae: str | Path | Weights) -> AutoencoderKL:
    """MAR's KL VAE from its official file (kl16.ckpt)."""
    weights = _as_weights(vae, False)
    _expect(weights, Format.VAE, "the VAE")
    return _built(AutoencoderKL, _vae_args(weights), weights.state, weights.source)


def load_mar(stage2: str | Path | Weights, ema: bool = True, heads: int | None = None,
             patch_size: int | None = None, vae_stride: int | None = None) -> MAR:
    """A MAR stage 2 (plain or with fusion weights) from its official file, without a VAE.

    The sizes the weights cannot tell (`mar_args_from_state`): the patch size is `patch_size`, else
    MAR's published 1; the VAE stride (hence img_size) is `vae_stride`, else kl16's 16. A native
    checkpoint gives its own MAR.
    """
    weights = _as_weights(stage2, ema)
    if weights.native is not None:
        return weights.native.mar
    _expect(weights, Format.MAR, "the MAR stage 2")
    args = fit_args("mar", lambda: mar_args_from_state(weights.state, weights.source, None, heads, patch_size,
                                                       vae_stride), weights.state, weights.source)
    return _built(MAR, args, weights.state, weights.source)


def _config_name(config: D2CConfig, stage2: Weights) -> str:
    """The preset's name when the sizes are a preset's, else the kind and the stage-2 file's stem."""
    body = {k: v for k, v in config.to_dict().items() if k != "name"}
    for name, preset in PRESETS.items():
        if {k: v for k, v in preset.to_dict().items() if k != "name"} == body:
            return name
    stem = stage2.path.stem if stage2.path is not None else "custom"
    return f"{'mar' if config.gpt is None else 'd2c'}-{stem}"


def assemble(stage2: str | Path | Weights, gpt: str | Path | Weights | None = None,
             vae: str | Path | Weights | None = None, *, ema: bool = True, mar_heads: int | None = None,
             gpt_heads: int | None = None, mar_patch_size: int | None = None) -> D2C:
    """A D2C (eval mode) from parts: a stage 2 (MAR or native), an optional LlamaGen GPT and a KL VAE.

    `stage2`: an official MAR checkpoint (plain MAR, or a D2C stage 2 in MAR's layout with fusion
    weights) or a native checkpoint; given `gpt` / `vae` replace a native checkpoint's parts. A MAR
    file needs `vae`; a stage 2 with fusion needs a GPT (its block_size is the stage 2's discrete
    length); plain MAR takes none. `ema` picks EMA weights where a file has them. `mar_heads` /
    `gpt_heads` give the head counts of sizes that are not official ones; `mar_patch_size` the patch
    size of a MAR that is not MAR's published 1 (the VAE must have token channels / patch_size^2
    latent channels; the stride and image size follow the VAE).
    """
    s2 = _as_weights(stage2, ema)
    g = None if gpt is None else _as_weights(gpt, ema)
    v = None if vae is None else _as_weights(vae, ema)
    if s2.format in (Format.GPT, Format.VAE):
        role, setting = ("the GPT", "gpt") if s2.format is Format.GPT else ("the VAE", "vae")
        raise CheckpointError(f"{s2.source}: a {s2.format.value} checkpoint is not a stage-2 checkpoint; pass it as "
                              f"{role} (", Setting(setting, "PATH"), ") with a MAR or D2C checkpoint as the stage 2 (",
                              Setting("stage2", "PATH"), ")")
    if g is not None:
        _expect(g, Format.GPT, "the GPT", "gpt")
    if v is not None:
        _expect(v, Format.VAE, "the VAE", "vae")
    base = s2.native
    if base is not None and g is None and v is None:
        return base

    if v is not None:
        vae_args, vae_state, vae_source = _vae_args(v), v.state, v.source
    elif base is not None:
        vae_args, vae_state, vae_source = base.config.vae, base.vae.state_dict(), s2.source
    else:
        raise CheckpointError(f"{s2.source}: a MAR checkpoint holds no VAE; pass the VAE too (", Setting("vae", "PATH"),
                              ", MAR's kl16.ckpt)")

    if base is not None:
        mar_args, mar_state = base.config.mar, base.mar.state_dict()
    else:
        mar_args = fit_args("mar", lambda: mar_args_from_state(s2.state, s2.source, vae_args, mar_heads,
                                                                mar_patch_size),
                            s2.state, s2.source, vae_args)
        mar_state = s2.state

    gpt_args = gpt_state = gpt_source = None
    if mar_args.fusion is Fusion.NONE:
        if g is not None:
            raise CheckpointError(f"{s2.source}: plain MAR (no fusion weights) has no discrete stage; drop the GPT "
                                  f"{g.source}")
    elif g is not None:
        gpt_args, gpt_state, gpt_source = _gpt_args(g, gpt_heads, mar_args.discrete_len), g.state, g.source
    elif base is not None and base.gpt is not None:
        gpt_args, gpt_state, gpt_source = base.config.gpt, base.gpt.state_dict(), s2.source
    else:
        raise CheckpointError(f"{s2.source}: a D2C stage 2 ({mar_args.fusion.value} fusion) needs its stage-1 GPT; "
                              "pass it too (", Setting("gpt", "PATH"), ", e.g. c2i_B_256.pt)")

    try:
        config = D2CConfig("", mar_args, vae_args, gpt_args)
    except ValueError as exc:
        parts = ", ".join(s for s in (gpt_source, s2.source, vae_source) if s)
        raise CheckpointError(f"the parts do not fit together ({parts}): {exc}") from None
    config.name = _config_name(config, s2)
    with torch.device(_device(mar_state, vae_state, gpt_state or {})):
        model = D2C(config)
    load_state_strict(model.mar, mar_state, s2.source)
    load_state_strict(model.vae, vae_state, vae_source)
    if gpt_state is not None:
        load_state_strict(model.gpt, gpt_state, gpt_source)
    log.info("assembled %s from %s", config.name, ", ".join(s for s in (gpt_source, s2.source, vae_source) if s))
    return model.eval()
