"""A contract fake of the part of the `tensorrt` Python API the backend and the plan builder use.

It follows TensorRT's documented contract, not the backend's code, and raises `ContractViolation` where
real TensorRT would fail or silently compute garbage. Each engine computes its outputs by running the
stage's ONNX graph with ONNX Runtime on the memory bound to it (through `FakeCudaDevice.view`). The rules,
with their sources (TensorRT 10.x/11.x `include/NvInferRuntime.h`, `IExecutionContext`, and the developer
guide):

- `setTensorAddress`: "An address defaults to nullptr. Pass data=nullptr to reset to the default state."
  and "The pointer must have at least 256-byte alignment." A misaligned address is refused (False) and the
  tensor keeps its previous address.
- `setInputShape`: "Each dimension must agree with the network dimension unless the latter was -1"; the
  developer guide ("Working with Dynamic Shapes", "Optimization Profiles"): at run time every input's
  dimensions lie within [min, max] of the selected profile. Out of bounds: False, the shape unchanged.
- `enqueueV3` (developer guide, "Performing Inference"): before it, every input's shape is set and every
  input and output tensor has an address; the memory behind each address holds the whole tensor.
- CUDA graphs (developer guide, "CUDA Graphs"; TensorRT issue #3798, quoting it: "use one execution
  context per captured graph"): a captured graph replays the kernels with the shapes and addresses it
  captured; once its context is changed (another shape or address set), replaying it is an error.
"""
from __future__ import annotations

import json
from enum import IntEnum
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from tests.d2c_export.backends.fake_cuda import ALIGNMENT, ContractViolation, FakeCudaDevice

VERSION = "10.13.0.fake"
_ONNX_DTYPES = {onnx.TensorProto.FLOAT: torch.float32, onnx.TensorProto.INT64: torch.int64,
                onnx.TensorProto.FLOAT16: torch.float16, onnx.TensorProto.INT32: torch.int32}


class TensorIOMode(IntEnum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class DataType(IntEnum):
    FLOAT = 0
    HALF = 1
    INT32 = 3
    BOOL = 4
    INT64 = 8


_TRT_DTYPE = {torch.float32: DataType.FLOAT, torch.float16: DataType.HALF, torch.int32: DataType.INT32,
              torch.int64: DataType.INT64, torch.bool: DataType.BOOL}


class Logger:
    WARNING = 2
    INFO = 3

    def __init__(self, severity: int = WARNING):
        self.severity = severity


class NetworkDefinitionCreationFlag(IntEnum):
    STRONGLY_TYPED = 5


class MemoryPoolType(IntEnum):
    WORKSPACE = 0


class BuilderFlag(IntEnum):
    TF32 = 7


# -- building ---------------------------------------------------------------------------------------------
class Network:
    def __init__(self, flags: int):
        self.flags = flags
        self.onnx: Path | None = None


class OnnxParser:
    def __init__(self, network: Network, logger: Logger):
        self.network = network
        self.num_errors = 0

    def parse_from_file(self, path: str) -> bool:
        onnx.checker.check_model(path)
        self.network.onnx = Path(path).resolve()
        return True


class OptimizationProfile:
    def __init__(self):
        self.shapes: dict[str, tuple[tuple[int, ...], ...]] = {}

    def set_shape(self, name: str, lo, opt, hi) -> None:
        lo, opt, hi = tuple(lo), tuple(opt), tuple(hi)
        if not (len(lo) == len(opt) == len(hi) and all(a <= b <= c for a, b, c in zip(lo, opt, hi))):
            raise ContractViolation(f"profile of {name}: min <= opt <= max is required, got {lo}, {opt}, {hi}")
        self.shapes[name] = (lo, opt, hi)


class TimingCache:
    def __init__(self, data: bytes):
        self.data = data or b"fake timing cache"

    def serialize(self) -> bytes:
        return self.data


class BuilderConfig:
    def __init__(self):
        self.profiles: list[OptimizationProfile] = []
        self.cache = None

    def set_memory_pool_limit(self, pool, size: int) -> None:
        if size <= 0:
            raise ContractViolation("memory pool limit must be positive")

    def clear_flag(self, flag) -> None:
        pass

    def add_optimization_profile(self, profile: OptimizationProfile) -> int:
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def create_timing_cache(self, data: bytes) -> TimingCache:
        return TimingCache(bytes(data))

    def set_timing_cache(self, cache: TimingCache, ignore_mismatch: bool) -> bool:
        self.cache = cache
        return True


class Builder:
    def __init__(self, logger: Logger):
        self.logger = logger

    def create_network(self, flags: int = 0) -> Network:
        if not flags & (1 << NetworkDefinitionCreationFlag.STRONGLY_TYPED):
            raise ContractViolation("networks are strongly typed (TensorRT 10.12+ deprecates the FP16 builder flag)")
        return Network(flags)

    def create_builder_config(self) -> BuilderConfig:
        return BuilderConfig()

    def create_optimization_profile(self) -> OptimizationProfile:
        return OptimizationProfile()

    def build_serialized_network(self, network: Network, config: BuilderConfig) -> bytes | None:
        model = onnx.load(str(network.onnx), load_external_data=False)
        dynamic = [i.name for i in model.graph.input if any(d.dim_param for d in i.type.tensor_type.shape.dim)]
        if len(config.profiles) != 1 or set(config.profiles[0].shapes) != set(dynamic):
            return None  # TensorRT needs a profile for every dynamic input
        return json.dumps({"onnx": str(network.onnx), "profile": config.profiles[0].shapes}).encode()


# -- running ----------------------------------------------------------------------------------------------
class Runtime:
    device: FakeCudaDevice  # the memory its engines run on (a subclass per `FakeTensorRT` sets it)
    fail_enqueue_in_capture = False

    def __init__(self, logger: Logger):
        self.logger = logger

    def deserialize_cuda_engine(self, data: bytes):
        try:
            plan = json.loads(bytes(data))
        except (ValueError, UnicodeDecodeError):
            return None
        return CudaEngine(plan, self.device, self)


class CudaEngine:
    def __init__(self, plan: dict, device: FakeCudaDevice, runtime: Runtime):
        self.device, self.runtime = device, runtime
        self.onnx = Path(plan["onnx"])
        self.profile = {n: tuple(tuple(s) for s in v) for n, v in plan["profile"].items()}
        model = onnx.load(str(self.onnx), load_external_data=False)
        self.io: dict[str, tuple[TensorIOMode, torch.dtype, tuple]] = {}
        for mode, values in ((TensorIOMode.INPUT, model.graph.input), (TensorIOMode.OUTPUT, model.graph.output)):
            for v in values:
                t = v.type.tensor_type
                dims = tuple(d.dim_param or d.dim_value for d in t.shape.dim)
                self.io[v.name] = (mode, _ONNX_DTYPES[t.elem_type], dims)
        self.names = list(self.io)
        self.session = ort.InferenceSession(str(self.onnx), providers=["CPUExecutionProvider"])
        self.contexts = 0

    @property
    def num_io_tensors(self) -> int:
        return len(self.names)

    def get_tensor_name(self, i: int) -> str:
        return self.names[i]

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        return self.io[name][0]

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return tuple(-1 if isinstance(d, str) else d for d in self.io[name][2])

    def get_tensor_dtype(self, name: str) -> DataType:
        return _TRT_DTYPE[self.io[name][1]]

    def create_execution_context(self) -> "ExecutionContext":
        self.contexts += 1
        return ExecutionContext(self)


class ExecutionContext:
    def __init__(self, engine: CudaEngine):
        self.engine = engine
        self.device = engine.device
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self.version = 0  # bumped by every change of shape or address; a captured graph remembers it
        self.executions = 0

    def _inputs(self) -> list[str]:
        return [n for n, (mode, _, _) in self.engine.io.items() if mode is TensorIOMode.INPUT]

    def set_input_shape(self, name: str, shape) -> bool:
        shape = tuple(int(d) for d in shape)
        mode, _, dims = self.engine.io[name]
        if mode is not TensorIOMode.INPUT or len(shape) != len(dims):
            return False
        if any(isinstance(d, int) and d != s for d, s in zip(dims, shape)):
            return False  # "each dimension must agree with the network dimension unless the latter was -1"
        if name in self.engine.profile:
            lo, _, hi = self.engine.profile[name]
            if not all(a <= s <= b for a, s, b in zip(lo, shape, hi)):
                return False
        if self.shapes.get(name) != shape:
            self.shapes[name] = shape
            self.version += 1
        return True

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        mode, _, dims = self.engine.io[name]
        if mode is TensorIOMode.INPUT:
            return self.shapes.get(name, tuple(-1 if isinstance(d, str) else d for d in dims))
        sizes = {}
        for n in self._inputs():
            if n in self.shapes:
                sizes.update({d: s for d, s in zip(self.engine.io[n][2], self.shapes[n]) if isinstance(d, str)})
        return tuple(sizes.get(d, -1) if isinstance(d, str) else d for d in dims)

    def set_tensor_address(self, name: str, address: int) -> bool:
        if name not in self.engine.io:
            return False
        if address and address % ALIGNMENT:
            return False  # "the pointer must have at least 256-byte alignment"
        if self.addresses.get(name, 0) != address:
            self.addresses[name] = address
            self.version += 1
        return True

    def _check_ready(self) -> tuple[dict, dict]:
        for n in self._inputs():
            if n not in self.shapes:
                raise ContractViolation(f"enqueueV3 before the shape of input {n} was set")
        shapes = {n: self.get_tensor_shape(n) for n in self.engine.names}
        for n in self.engine.names:
            if not self.addresses.get(n):
                raise ContractViolation(f"enqueueV3 with no (null) address for tensor {n!r}: every input and output "
                                        "needs a non-null, 256-byte-aligned address")
        return shapes, dict(self.addresses)

    def _compute(self, shapes: dict, addresses: dict) -> None:
        feeds = {}
        for n in self._inputs():
            dtype = self.engine.io[n][1]
            feeds[n] = self.device.view(addresses[n], shapes[n], dtype).numpy().copy()
        outputs = self.engine.session.run(None, feeds)
        for o, value in zip((x.name for x in self.engine.session.get_outputs()), outputs):
            dtype = self.engine.io[o][1]
            if tuple(value.shape) != tuple(shapes[o]):
                raise ContractViolation(f"output {o}: the context's shapes give {shapes[o]}, the network {value.shape}")
            self.device.view(addresses[o], shapes[o], dtype).copy_(torch.from_numpy(np.ascontiguousarray(value)))

    def execute_async_v3(self, stream_handle: int) -> bool:
        shapes, addresses = self._check_ready()
        capturing = self.device.capturing
        if capturing is not None:
            if self.engine.runtime.fail_enqueue_in_capture:
                return False  # a kernel that fails to enqueue: the documented failure mode is the False return
            graph, stream = capturing
            if stream.handle != stream_handle:
                raise ContractViolation("enqueueV3 on another stream than the one being captured")
            version = self.version

            def launch() -> None:
                if self.version != version:
                    raise ContractViolation("a CUDA graph replayed after its execution context was given other "
                                            "shapes or addresses: use one execution context per captured graph")
                self._compute(shapes, addresses)

            graph.launches.append(launch)
            return True
        self._compute(shapes, addresses)
        self.executions += 1
        return True


class FakeTensorRT:
    """The `tensorrt` module as the backend and the builder see it, over one `FakeCudaDevice`."""

    __version__ = VERSION
    Logger = Logger
    Builder = Builder
    OnnxParser = OnnxParser
    NetworkDefinitionCreationFlag = NetworkDefinitionCreationFlag
    MemoryPoolType = MemoryPoolType
    BuilderFlag = BuilderFlag
    TensorIOMode = TensorIOMode
    DataType = DataType

    def __init__(self, device: FakeCudaDevice):
        self.device = device
        self.Runtime = type("Runtime", (Runtime,), {"device": device})

    def fail_next_enqueue_in_capture(self, fail: bool = True) -> None:
        self.Runtime.fail_enqueue_in_capture = fail
