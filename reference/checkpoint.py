"""The native D2C checkpoint: one .safetensors file of D2C.state_dict() with the config in its metadata."""
from __future__ import annotations

import json
import logging
import os
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from reference.errors import BadInput
from reference.files import atomic_path, sha256_file
from reference.model import D2C, D2CConfig

__all__ = ["CheckpointError", "CheckpointNotFoundError", "FORMAT_VERSION", "CONFIG_KEY", "VERSION_KEY",
           "save_checkpoint", "load_checkpoint", "load_state_strict", "read_metadata", "checkpoint_sha256"]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
CONFIG_KEY = "d2c_config"
VERSION_KEY = "format_version"
MAX_LISTED = 10  # keys listed per kind of mismatch in an error message
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header


class CheckpointError(BadInput):
    """A checkpoint file that cannot be read, or whose weights do not fit the model."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint path does not exist."""


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------
def _plain_tensors(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Detached, contiguous CPU tensors."""
    return {key: value.detach().cpu().contiguous() for key, value in state.items()}


_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}


def _write_safetensors(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write a safetensors file byte-for-byte reproducibly (sorted keys; the library's metadata order
    is not), streaming tensor by tensor, then fsync. A seam for tests."""
    header: dict[str, object] = {"__metadata__": dict(sorted(metadata.items()))}
    names, offset = sorted(tensors), 0
    for name in names:
        t = tensors[name]
        if t.dtype not in _DTYPES:
            raise TypeError(f"cannot store {name} of dtype {t.dtype} in a checkpoint")
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name in names:
            t = tensors[name]
            if t.numel():
                f.write(t.reshape(-1).view(torch.uint8).numpy().data)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(model: D2C, path: str | Path) -> Path:
    """Write `model`'s weights and config to `path` atomically (temp file in the same folder + os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {CONFIG_KEY: json.dumps(model.config.to_dict(), sort_keys=True), VERSION_KEY: str(FORMAT_VERSION)}
    tensors = _plain_tensors(model.state_dict())
    with atomic_path(path) as tmp:
        _write_safetensors(tensors, tmp, metadata)
    log.info("saved checkpoint %s (%d tensors, config %s)", path, len(tensors), model.config.name)
    return path


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------
def _check_file(path: Path) -> None:
    if not path.exists():
        raise CheckpointNotFoundError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a regular file")


def _read_header(path: Path) -> dict:
    """Parse and validate the safetensors header of `path`: the JSON dict, sizes checked against the file."""
    _check_file(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors file ({size} bytes, too short for a header)")
        (n,) = struct.unpack("<Q", head)
        if n == 0 or n > _MAX_HEADER:
            raise CheckpointError(f"{path}: not a safetensors file (implausible header length {n})")
        if 8 + n > size:
            raise CheckpointError(f"{path}: truncated or not a safetensors file "
                                  f"(header of {n} bytes, file of {size} bytes)")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not a safetensors file (header is not JSON: {exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (header is not a JSON object)")
    end = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            end = max(end, int(info["data_offsets"][1]))
        except (TypeError, KeyError, IndexError, ValueError):
            raise CheckpointError(f"{path}: not a safetensors file (bad entry for {key!r})") from None
    if 8 + n + end != size:
        what = "truncated" if 8 + n + end > size else "has trailing bytes"
        raise CheckpointError(f"{path}: {what}: the header describes {8 + n + end} bytes, the file has {size}")
    return header


def read_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a safetensors file (validated like `load_checkpoint` does)."""
    meta = _read_header(Path(path)).get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: malformed safetensors metadata")
    return meta


def _config_from_metadata(path: Path, meta: dict[str, str]) -> D2CConfig | None:
    version = meta.get(VERSION_KEY)
    if version is not None:
        try:
            v = int(version)
        except ValueError:
            raise CheckpointError(f"{path}: bad {VERSION_KEY} {version!r}") from None
        if v > FORMAT_VERSION:
            raise CheckpointError(f"{path}: checkpoint format {v} is newer than this code's {FORMAT_VERSION}")
    if CONFIG_KEY not in meta:
        return None
    try:
        return D2CConfig.from_dict(json.loads(meta[CONFIG_KEY]))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: invalid {CONFIG_KEY} metadata: {type(exc).__name__}: {exc}") from None


def _fmt_shape(shape) -> str:
    return "(" + ", ".join(str(int(s)) for s in shape) + ")"


def _listing(title: str, items: list[str]) -> str:
    shown = "\n    ".join(items[:MAX_LISTED])
    more = f"\n    ... and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
    return f"  {len(items)} {title}:\n    {shown}{more}"


def load_state_strict(module: nn.Module, state: dict[str, Tensor], source: str) -> None:
    """Load `state` into `module`, refusing any missing, unexpected or mis-shaped key (CheckpointError)."""
    expected = module.state_dict()
    missing = [f"{k} (expected {_fmt_shape(v.shape)})" for k, v in expected.items() if k not in state]
    unexpected = [f"{k} (found {_fmt_shape(v.shape)})" for k, v in state.items() if k not in expected]
    misshaped = [f"{k}: expected {_fmt_shape(expected[k].shape)}, found {_fmt_shape(v.shape)}"
                 for k, v in state.items() if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    if missing or unexpected or misshaped:
        counts = ", ".join(f"{len(items)} {name}" for name, items in
                           (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)) if items)
        parts = [_listing(name, items) for name, items in (("missing keys", missing),
                 ("unexpected keys", unexpected), ("mis-shaped keys", misshaped)) if items]
        raise CheckpointError(f"{source}: state does not match {type(module).__name__} ({counts}):\n"
                              + "\n".join(parts))
    with torch.no_grad():
        module.load_state_dict(state, strict=True)


def load_checkpoint(path: str | Path, config: D2CConfig | None = None) -> D2C:
    """Build a D2C from a native checkpoint (config from its metadata unless given) in eval mode; strict."""
    path = Path(path)
    meta = read_metadata(path)
    stored = _config_from_metadata(path, meta)
    if config is None:
        if stored is None:
            raise CheckpointError(f"{path}: no {CONFIG_KEY!r} metadata (not a D2C checkpoint?); pass config=")
        config = stored
    elif stored is not None and stored.to_dict() != config.to_dict():
        log.warning("%s: the given config %r differs from the stored one %r; using the given one",
                    path, config.name, stored.name)
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable safetensors data: {exc}") from None
    model = D2C(config)
    load_state_strict(model, state, str(path))
    log.info("loaded checkpoint %s (config %s)", path, config.name)
    return model.eval()


def checkpoint_sha256(path: str | Path) -> str:
    """Hex SHA-256 of the file's bytes."""
    path = Path(path)
    _check_file(path)
    return sha256_file(path)
