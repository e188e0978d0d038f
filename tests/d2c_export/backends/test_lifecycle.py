"""Every backend gives back what it holds in `close()`: opened, run and closed many times (TensorRT and the CUDA graphs
under their contract fakes), what it held comes back after each close while the closed object is still referenced."""
from __future__ import annotations

import gc
import shutil

import pytest
import torch

from d2c_export.backends import Precision, Target, open_backend
from d2c_export.backends.pytorch import TorchBackend
from d2c_export.backends.trt import TrtBackend
from d2c_export.engines import Engines
from d2c_export.export.trt_build import build_engines
from d2c_export.generate import generate_images
from reference.pipeline import SamplingParams
from tests.d2c_export.backends.fake_cuda import FakeCudaDevice, FakeGraph
from tests.d2c_export.backends.fake_tensorrt import ExecutionContext, FakeTensorRT

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CYCLES = 5
PARAMS = SamplingParams(cfg=3.0, num_iter=2, diffusion_steps=3)
OPENERS = {  # (engines, fake device, fake tensorrt) -> an open backend
    "torch": lambda e, device, trt: open_backend(e, Target.parse("torch"), device="cpu"),
    "torch-bf16, CUDA graphs": lambda e, device, trt: TorchBackend(e, "cpu", Precision.BF16, graph_device=device),
    "ort": lambda e, device, trt: open_backend(e, Target.parse("ort"), threads=1),
    "trt": lambda e, device, trt: TrtBackend(e, Precision.FP32, trt=trt, device=device),
}


def held(device: FakeCudaDevice) -> dict[str, int]:
    """What the process holds: bytes of every tensor storage Python reaches (each once), ONNX Runtime sessions, TensorRT
    execution contexts and CUDA graphs (of the fakes), and the fake device's memory."""
    from onnxruntime import InferenceSession
    gc.collect()
    storages: dict[int, int] = {}
    counts = {"sessions": 0, "contexts": 0, "graphs": 0}
    for o in gc.get_objects():
        if type(o) in (torch.Tensor, torch.nn.Parameter):  # not the tracing kinds (FakeTensor) export leaves
            if o.device.type != "meta" and o.untyped_storage().nbytes():
                storages[o.untyped_storage().data_ptr()] = o.untyped_storage().nbytes()
        elif issubclass(type(o), InferenceSession):  # type(), not isinstance: a deprecated module attribute warns
            counts["sessions"] += 1
        elif issubclass(type(o), ExecutionContext):
            counts["contexts"] += 1
        elif issubclass(type(o), FakeGraph):
            counts["graphs"] += 1
    return {"tensor bytes": sum(storages.values()), **counts, "device bytes": device.memory_used()}


@pytest.fixture(scope="module")
def engines(engines_factory, tmp_path_factory) -> Engines:
    """d2c-tiny with FP32 plans built by the real builder on the fakes.

    Everything alive once it is built (the session's earlier tests left millions of objects: every `held` walked them
    all and every gc.collect traversed them) is frozen out of the collector for this module: `held` sees every
    object made since, which is all that a backend opened here can hold."""
    directory = tmp_path_factory.mktemp("lifecycle") / "engines"
    shutil.copytree(engines_factory("d2c-tiny"), directory)
    device = FakeCudaDevice()
    build_engines(Engines.open(directory), fp16=False, progress=False, trt=FakeTensorRT(device), device=device)
    engines = Engines.open(directory)
    engines.model()  # the engines' own model (shared by the PyTorch backends) is built once, before counting
    gc.collect()
    gc.freeze()
    try:
        yield engines
    finally:
        gc.unfreeze()


@pytest.mark.parametrize("name", OPENERS)
def test_a_closed_backend_gives_back_what_it_held(engines, name):
    device = FakeCudaDevice()
    trt = FakeTensorRT(device)

    def cycle():
        with OPENERS[name](engines, device, trt) as backend:
            generate_images(backend, [1, 2], PARAMS, seed=0)
            generate_images(backend, [3], PARAMS, seed=1)  # a second shape: more bindings, caches, graphs
            during = held(device)
        return backend, during

    cycle()  # the first generation fills what lives on after it (diffusion tables), outside any backend
    before = held(device)
    for _ in range(CYCLES):
        backend, during = cycle()
        assert held(device) == before, (name, during, before)  # `backend` is still referenced here
    grew = {k for k in before if during[k] > before[k]}
    assert grew, (name, during, before)  # it did hold something while open: the check can fail
    print(f"{name}: held while open {({k: during[k] - before[k] for k in grew})}, all given back by close()")
