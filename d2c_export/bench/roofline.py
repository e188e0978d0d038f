"""The measured matmul roofline that stage FLOP/s are set against: the better of torch and ONNX Runtime."""
from __future__ import annotations

import time

import numpy as np
import torch
from onnx import TensorProto, helper

from d2c_export.backends.ort import onnxruntime
from d2c_export.sources import DEFAULT_OPSET

ROOFLINE_SIZE = 2048  # square fp32 matmul that sets the roofline
ROOFLINE_RUNS = 5  # best of this many timed products


def _matmul_graph(size: int) -> bytes:
    rng = np.random.default_rng(0)
    b = helper.make_tensor("b", TensorProto.FLOAT, (size, size), rng.standard_normal((size, size), np.float32).ravel())
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "roofline",
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, (size, size))],
                              [helper.make_tensor_value_info("c", TensorProto.FLOAT, (size, size))], [b])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", DEFAULT_OPSET)]).SerializeToString()


def _best_seconds(fn, runs: int) -> float:
    fn()
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def matmul_roofline(device: str, threads: int, with_ort: bool, size: int = ROOFLINE_SIZE,
                    runs: int = ROOFLINE_RUNS) -> dict[str, float]:
    """Achievable fp32 FLOP/s of a large square matmul on `device`: torch, ORT's MatMul, and their max."""
    flops = 2.0 * size ** 3
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    out = {"torch": flops / _best_seconds(lambda: (torch.matmul(a, b), sync()), runs)}
    if with_ort:
        ort = onnxruntime()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        providers = ["CUDAExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
        session = ort.InferenceSession(_matmul_graph(size), sess_options=opts, providers=providers)
        binding = session.io_binding()  # operands stay on the device: no host copies in the timing
        binding.bind_ortvalue_input("a", ort.OrtValue.ortvalue_from_numpy(a.cpu().numpy(), device, 0))
        binding.bind_output("c", device)
        out["ort"] = flops / _best_seconds(lambda: session.run_with_iobinding(binding), runs)
    out["peak"] = max(out.values())
    return out
