"""The ONNX Runtime backend: where the loop's tensors live, whichever provider computes."""
from __future__ import annotations

import torch

from d2c_export.backends.ort import CPU, CUDA, OrtBackend, onnxruntime
from d2c_export.bench.run import Column
from d2c_export.engines import Engines
from d2c_export.backends import Precision
from reference.diffusion import make_tables, step_tables


def test_the_loop_stays_on_the_host_under_the_cuda_provider(engines_factory, monkeypatch):
    """`run` feeds ONNX Runtime host arrays, so the loop keeps host tensors even where the CUDA provider computes
    (device-resident loop tensors there would meet `Tensor.numpy()`); the benchmark still times it as CUDA."""
    engines = Engines.open(engines_factory("d2c-tiny"))
    with OrtBackend(engines, Precision.FP32, threads=1) as cpu:
        assert (cpu.device, cpu.compute_device) == ("cpu", "cpu")
        m = engines.config.mar
        feeds = {"noise": torch.randn(3, 2, m.token_dim), "z": torch.randn(4, m.decoder_embed_dim),
                 **step_tables(make_tables(2)), "cfg": torch.tensor([2.0]), "temperature": torch.tensor([1.0])}
        assert cpu.denoise(feeds).device.type == "cpu"
    monkeypatch.setattr(onnxruntime().InferenceSession, "get_providers", lambda self: [CUDA, CPU])
    with OrtBackend(engines, Precision.FP32, threads=1, provider_list=[CPU]) as gpu:
        assert gpu.providers[0] == CUDA
        assert (gpu.device, gpu.compute_device) == ("cpu", "cuda")
        assert Column(gpu.target, gpu).device == "cuda"
