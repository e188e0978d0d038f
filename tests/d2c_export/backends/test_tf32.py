"""FP32 means FP32 on CUDA too. PyTorch lets cuDNN run FP32 convolutions as TF32 by default
(`torch.backends.cudnn.allow_tf32`), and cuBLAS its matmuls once asked (`torch.set_float32_matmul_precision("high")`);
TF32 keeps 10 of FP32's 23 mantissa bits, beyond the torch-fp32 limits. Here the CPU stands in for CUDA: TF32 is
emulated on it wherever PyTorch's flags would allow it on a GPU (`TF32Emulation`)."""
from __future__ import annotations

from collections import Counter
from contextlib import contextmanager

import pytest
import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from d2c_export.backends import open_backend, pytorch
from d2c_export.backends import Target
from d2c_export.verify.parity import check_stage, compare
from reference.stage_networks import as_outputs

CONVOLUTIONS = {torch.conv1d, torch.conv2d, torch.conv3d}  # cuDNN
MATMULS = {torch.nn.functional.linear, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm,
           torch.bmm}  # cuBLAS


def tf32(x: Tensor) -> Tensor:
    """`x` rounded to TF32 (FP32's range, 10 mantissa bits), to nearest: what a tensor core reads of an FP32 operand."""
    bits = x.contiguous().view(torch.int32)
    return ((bits + (1 << 12)) & ~((1 << 13) - 1)).view(torch.float32)


def tf32_allowed(op: str) -> bool:
    """Whether PyTorch's flags let CUDA run FP32 `op` ("conv" or "matmul") as TF32: the first of the op's own
    setting, CUDA's and the generic one that is not "none" (how PyTorch resolves them) is "tf32"."""
    own = torch.backends.cudnn.conv.fp32_precision if op == "conv" else torch.backends.cuda.matmul.fp32_precision
    for setting in (own, torch.backends.cudnn.fp32_precision, torch.backends.fp32_precision):
        if setting != "none":
            return setting == "tf32"
    return False


class TF32Emulation(TorchFunctionMode):
    """FP32 convolutions and matmuls as a CUDA device runs them under PyTorch's current flags: where TF32 is allowed,
    both operands rounded to TF32 and the products summed in FP32. Counts the calls it saw and those it rounded."""

    def __init__(self):
        super().__init__()
        self.seen: Counter[str] = Counter()
        self.rounded: Counter[str] = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        op = "conv" if func in CONVOLUTIONS else "matmul" if func in MATMULS else None
        if op is not None:
            self.seen[op] += 1
            if tf32_allowed(op):
                self.rounded[op] += 1
                args = tuple(tf32(a) if i < 2 and isinstance(a, Tensor) and a.dtype == torch.float32 else a
                             for i, a in enumerate(args))
        return func(*args, **(kwargs or {}))


class OnTF32Device:
    """`backend`'s stage calls under TF32Emulation, as on a GPU; the parity reference (the CPU) stays exact."""

    def __init__(self, backend):
        self.backend, self.target, self.emulation = backend, backend.target, TF32Emulation()

    def run(self, stage: str, inputs: dict[str, Tensor]) -> tuple[Tensor, ...]:
        with self.emulation:
            return self.backend.run(stage, inputs)


@contextmanager
def tf32_flags(matmul_precision: str):
    """cuDNN's TF32 switch on (its default) and cuBLAS's matmul precision `matmul_precision` ("high": TF32), for the
    block; the flags are global, so they are given back after it."""
    cudnn, matmul = torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()
    torch.backends.cudnn.allow_tf32 = True
    torch.set_float32_matmul_precision(matmul_precision)
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = cudnn
        torch.set_float32_matmul_precision(matmul)


@torch.no_grad()
def test_tf32_misses_the_fp32_limits(engines):
    """The emulation bites: TF32 puts the VAE (convolutions) and the gpt logits (matmuls) past torch-fp32."""
    model = engines.model()
    for name, flags in (("vae", tf32_flags("highest")), ("gpt", tf32_flags("high"))):
        spec = engines.specs(name)[0]
        module, feeds = spec.wrapper(model).eval(), spec.example_inputs(engines.config, max_batch=engines.max_batch)
        exact = as_outputs(module(*feeds.values()))
        with flags, TF32Emulation() as emulation:
            rounded = as_outputs(module(*feeds.values()))
        assert emulation.rounded["conv" if name == "vae" else "matmul"] > 0
        result = compare(rounded[0].numpy(), exact[0].numpy())
        assert not result.within(spec.tolerance("torch-fp32")) and result.within(spec.tolerance("torch-fp16")), result


@pytest.mark.parametrize("matmul_precision", ["highest", "high"], ids=["pytorch-defaults", "tf32-asked-for"])
def test_the_fp32_target_computes_in_fp32_where_tf32_is_allowed(engines, monkeypatch, matmul_precision):
    monkeypatch.setattr(pytorch, "TF32_DEVICE_TYPES", frozenset({"cuda", "cpu"}), raising=False)  # the CPU as CUDA
    model = engines.model()
    with tf32_flags(matmul_precision), open_backend(engines, Target.parse("torch"), device="cpu") as backend:
        device = OnTF32Device(backend)
        reports = [r for spec in engines.specs() for r in check_stage(model, spec, device, engines.max_batch)]
        assert torch.backends.cudnn.allow_tf32 and torch.get_float32_matmul_precision() == matmul_precision
    failed = [(r.stage, r.output, r.sizes, r.result) for r in reports if not r.passed]
    assert reports and not failed, failed
    assert device.emulation.seen["conv"] > 0 and device.emulation.seen["matmul"] > 0
    assert not device.emulation.rounded
