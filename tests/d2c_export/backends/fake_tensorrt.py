"""A contract fake of the part of the `tensorrt` Python API the backend and the plan builder use.

It follows TensorRT's documented contract, not the backend's code, and raises `ContractViolation` where
real TensorRT would fail or silently compute garbage. Each engine computes its outputs by running the
stage's ONNX graph with ONNX Runtime on the memory bound to it (through `FakeCudaDevice.view`). The rules,
with their sources (TensorRT 10.x/11.x `include/NvInferRuntime.h`, `IExecutionContext` and `ICudaEngine`, the
Python API reference of `tensorrt.ICudaEngine` / `tensorrt.IExecutionContext`, and the developer guide):

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
  captured; once its context is changed (another shape, address or device memory set), replaying it is an error.
  "When the stream is capturing, the enqueue call may return false if the current CUDA graph capture fails"
  (`samples/common/sampleInference.cpp`, which then ends the capture and runs without graphs): here
  `fail_next_enqueue_in_capture` makes one enqueue inside a capture return False, invalidating the capture or
  leaving a graph that must not be used (`cudaStreamEndCapture`'s two outcomes, as that sample handles them).
- Execution context memory (`ExecutionContextAllocationStrategy`): kSTATIC, the default, is "static allocation
  with the maximum size across all profiles" (`getDeviceMemorySizeV2`), owned by the context while it lives;
  with kUSER_MANAGED "the user supplies custom allocation": `setDeviceMemoryV2(memory, size)` (Python
  `set_device_memory`) before `enqueueV3`, the memory "aligned with CUDA memory alignment property" and "large
  enough for performing inference with the given network inputs", for which `getDeviceMemorySizeV2` and
  `getDeviceMemorySizeForProfileV2` "report upper bounds"; `updateDeviceMemorySizeForShapes` "recompute[s] the
  internal activation buffer sizes based on the current input shapes, and return[s] the total amount of memory
  required" (all input shapes set first, "0 if error occurred"). So the memory needed is that size while the
  shapes are the ones it was computed for, else the profile's upper bound. Using the memory "in another execution
  context running in parallel" is undefined: contexts that share memory here must enqueue on one stream.
  The fake sizes activation memory as `ACTIVATION_COPIES` times the bytes of the engine's tensors at the shapes.
- Deprecations: TensorRT 10.1 deprecates `getDeviceMemorySize`, `getDeviceMemorySizeForProfile` and
  `setDeviceMemory` for their V2 forms (Python `device_memory_size`, `get_device_memory_size_for_profile` and
  the `device_memory` setter: a DeprecationWarning), 10.0 `createExecutionContextWithoutDeviceMemory`;
  TensorRT 11 removes deprecated APIs (`FakeTensorRT(device, API_11)`: those names do not exist).
- One logger per process: TensorRT warns "The logger passed into createInferRuntime differs from one already
  provided for an existing builder, runtime, or refitter" (counted in `logger_warnings`).
- Strongly typed networks (developer guide, "Strongly Typed Networks"): types come from the network inputs
  and the casts; a network input may be given another type only where every layer reading it is a Cast
  (any other layer would see a type the network was not written for: the build fails).
"""
from __future__ import annotations

import ast
import json
import logging
import operator
import weakref
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from tests.d2c_export.backends.fake_cuda import ALIGNMENT, ContractViolation, FakeCudaDevice
from tests.d2c_export.backends.fake_trt_build import (ONNX_DTYPES, TORCH_DTYPE, TRT_DTYPE, Builder, BuilderFlag,
                                                      DataType, ExecutionContextAllocationStrategy, FakeApi, Logger,
                                                      MemoryPoolType, NetworkDefinitionCreationFlag, OnnxParser,
                                                      TensorIOMode, nbytes_of)

API_10 = "10.13.0.fake"
API_11 = "11.0.0.fake"
VERSION = API_10
ACTIVATION_COPIES = 2  # a context's activation memory: this many times its tensors' bytes at its shapes
log = logging.getLogger(__name__)


# -- running ----------------------------------------------------------------------------------------------
class Runtime(FakeApi):
    def __init__(self, logger: Logger):
        self.use_logger(logger)

    @property
    def device(self) -> FakeCudaDevice:
        return self.trt.device

    def deserialize_cuda_engine(self, data: bytes):
        try:
            plan = json.loads(bytes(data))
        except (ValueError, UnicodeDecodeError):
            return None
        return CudaEngine(plan, self)


_DIM_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv}


def dim_size(dim: str, sizes: dict[str, int]) -> int:
    """A symbolic dimension's size: a named dimension's, or integer arithmetic of them (`recent_len + 4`); else -1."""
    def value(node: ast.AST) -> int:
        if isinstance(node, ast.Name):
            return sizes[node.id]
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _DIM_OPS:
            return _DIM_OPS[type(node.op)](value(node.left), value(node.right))
        raise KeyError(dim)

    if dim in sizes:
        return sizes[dim]
    try:
        return value(ast.parse(dim, mode="eval").body)
    except (KeyError, SyntaxError):
        return -1


class CudaEngine:
    def __init__(self, plan: dict, runtime: Runtime):
        self.runtime, self.api, self.device = runtime, runtime, runtime.device
        self.onnx = Path(plan["onnx"])
        self.profile = {n: tuple(tuple(s) for s in v) for n, v in plan["profile"].items()}
        model = onnx.load(str(self.onnx), load_external_data=False)
        retyped = {n: TORCH_DTYPE[DataType(d)] for n, d in plan.get("dtypes", {}).items()}
        self.io: dict[str, tuple[TensorIOMode, torch.dtype, tuple]] = {}
        self.declared: dict[str, torch.dtype] = {}  # the graph's own dtypes, which ONNX Runtime is fed
        for mode, values in ((TensorIOMode.INPUT, model.graph.input), (TensorIOMode.OUTPUT, model.graph.output)):
            for v in values:
                t = v.type.tensor_type
                dims = tuple(d.dim_param or d.dim_value for d in t.shape.dim)
                self.declared[v.name] = ONNX_DTYPES[t.elem_type]
                self.io[v.name] = (mode, retyped.get(v.name, self.declared[v.name]), dims)
        self.names = list(self.io)
        options = ort.SessionOptions()
        if any(d is torch.float16 for d in self.declared.values()) or any(
                t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer):
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every FP16 cast
        self.session = ort.InferenceSession(str(self.onnx), options, providers=["CPUExecutionProvider"])
        self.weight_bytes = sum(nbytes_of(tuple(w.dims), ONNX_DTYPES.get(w.data_type, torch.float32))
                                for w in model.graph.initializer)
        self.weights = self.device.reserve(self.weight_bytes, self)  # the plan's weights, on the device while it lives
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
        return TRT_DTYPE[self.io[name][1]]

    def inputs(self) -> list[str]:
        return [n for n, (mode, _, _) in self.io.items() if mode is TensorIOMode.INPUT]

    def shapes_for(self, inputs: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        """Every tensor's shape for these input shapes: dynamic dimensions named alike are equal, and an output's
        dimension the graph writes as arithmetic of input dimensions (`recent_len + 4`) is computed, as TensorRT
        computes it from the network; -1 where the inputs do not decide it."""
        sizes = {}
        for n, shape in inputs.items():
            sizes.update({d: s for d, s in zip(self.io[n][2], shape) if isinstance(d, str)})
        return {n: tuple(dim_size(d, sizes) if isinstance(d, str) else d for d in dims)
                for n, (_, _, dims) in self.io.items()}

    def activation_bytes(self, inputs: dict[str, tuple[int, ...]]) -> int:
        """The fake's activation memory for these input shapes (aligned)."""
        total = ACTIVATION_COPIES * sum(nbytes_of(s, self.io[n][1]) for n, s in self.shapes_for(inputs).items())
        return -(-total // ALIGNMENT) * ALIGNMENT

    # -- memory sizes (V2: TensorRT 10.1+; the V1 names are deprecated in 10.1 and gone in 11) -------------------
    @property
    def device_memory_size_v2(self) -> int:
        return self.get_device_memory_size_for_profile_v2(0)

    def get_device_memory_size_for_profile_v2(self, profile_index: int) -> int:
        if profile_index != 0:
            raise ContractViolation(f"profile {profile_index} of an engine built with one profile")
        return self.activation_bytes({n: self.profile[n][2] if n in self.profile else self.get_tensor_shape(n)
                                      for n in self.inputs()})

    @property
    def device_memory_size(self) -> int:
        self.api.deprecated("ICudaEngine.device_memory_size", "device_memory_size_v2")
        return self.device_memory_size_v2

    def get_device_memory_size_for_profile(self, profile_index: int) -> int:
        self.api.deprecated("ICudaEngine.get_device_memory_size_for_profile", "get_device_memory_size_for_profile_v2")
        return self.get_device_memory_size_for_profile_v2(profile_index)

    def create_execution_context(self, strategy: ExecutionContextAllocationStrategy =
                                 ExecutionContextAllocationStrategy.STATIC) -> "ExecutionContext":
        self.contexts += 1
        context = ExecutionContext(self, ExecutionContextAllocationStrategy(strategy))
        self.runtime.trt.live_contexts.add(context)
        return context

    def create_execution_context_without_device_memory(self) -> "ExecutionContext":
        self.api.deprecated("ICudaEngine.create_execution_context_without_device_memory",
                            "create_execution_context(ExecutionContextAllocationStrategy.USER_MANAGED)")
        return self.create_execution_context(ExecutionContextAllocationStrategy.USER_MANAGED)


class ExecutionContext:
    def __init__(self, engine: CudaEngine, strategy: ExecutionContextAllocationStrategy):
        self.engine = engine
        self.device = engine.device
        self.strategy = strategy
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self.memory: tuple[int, int] | None = None  # (address, size) of its activation memory
        self.sized_for: dict | None = None  # the input shapes `update_device_memory_size_for_shapes` sized it for
        if strategy is not ExecutionContextAllocationStrategy.USER_MANAGED:  # its own, the profile's maximum
            size = engine.device_memory_size_v2
            self.memory = (self.device.reserve(size, self), size)
        self.version = 0  # bumped by every change of shape, address or memory; a captured graph remembers it
        self.executions = 0

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
        if self.engine.io[name][0] is TensorIOMode.INPUT and name in self.shapes:
            return self.shapes[name]
        return self.engine.shapes_for(self.shapes)[name]

    def set_tensor_address(self, name: str, address: int) -> bool:
        if name not in self.engine.io:
            return False
        if address and address % ALIGNMENT:
            return False  # "the pointer must have at least 256-byte alignment"
        if self.addresses.get(name, 0) != address:
            self.addresses[name] = address
            self.version += 1
        return True

    # -- activation memory ----------------------------------------------------------------------------------
    def set_device_memory(self, memory: int, size: int) -> None:
        if self.strategy is not ExecutionContextAllocationStrategy.USER_MANAGED:
            raise ContractViolation("set_device_memory on a context that owns its memory (not USER_MANAGED)")
        if memory % ALIGNMENT or (memory == 0 and size):
            raise ContractViolation(f"device memory at {memory:#x} is null or not {ALIGNMENT}-byte aligned")
        if size:
            self.device.view(memory, (size,), torch.uint8)  # inside one live device allocation
        if self.memory != (memory, size):
            self.memory = (memory, size)
            self.version += 1

    @property
    def device_memory(self):
        raise AttributeError("device_memory is write-only")

    @device_memory.setter
    def device_memory(self, memory: int) -> None:
        self.engine.api.deprecated("IExecutionContext.device_memory", "set_device_memory(memory, size)")
        self.set_device_memory(memory, self.engine.device_memory_size_v2)

    def update_device_memory_size_for_shapes(self) -> int:
        if any(n not in self.shapes for n in self.engine.inputs()):
            return 0  # "must specify all input dimensions": 0 on error
        if self.sized_for != self.shapes:
            self.sized_for = dict(self.shapes)
            self.version += 1  # the activations are laid out anew
        return self.engine.activation_bytes(self.shapes)

    def _required_memory(self) -> int:
        if self.sized_for == self.shapes:
            return self.engine.activation_bytes(self.shapes)
        return self.engine.device_memory_size_v2  # laid out for the profile's largest shapes

    def _check_memory(self, stream_handle: int) -> None:
        if self.memory is None:
            raise ContractViolation("enqueueV3 of a USER_MANAGED context before set_device_memory")
        memory, size = self.memory
        required = self._required_memory()
        if size < required:
            raise ContractViolation(f"enqueueV3 with {size} bytes of device memory where these shapes need "
                                    f"{required} (update_device_memory_size_for_shapes after setting the shapes)")
        if self.strategy is ExecutionContextAllocationStrategy.USER_MANAGED and required:
            region = self.device.view(memory, (required,), torch.uint8)  # live, and large enough
            region[:ALIGNMENT].fill_(0xFF)  # the kernels overwrite their scratch
            region[-ALIGNMENT:].fill_(0xFF)
            backing = self.device.allocation(memory).backing
            users = self.engine.runtime.trt.memory_streams
            stream, owner = users.get(memory, (stream_handle, backing))
            if stream != stream_handle and owner() is backing():
                raise ContractViolation("two contexts share device memory on different streams, where they may run "
                                        "in parallel")
            users[memory] = (stream_handle, backing)

    # -- running ---------------------------------------------------------------------------------------------
    def _check_ready(self, stream_handle: int) -> tuple[dict, dict]:
        for n in self.engine.inputs():
            if n not in self.shapes:
                raise ContractViolation(f"enqueueV3 before the shape of input {n} was set")
        shapes = {n: self.get_tensor_shape(n) for n in self.engine.names}
        for n in self.engine.names:
            if not self.addresses.get(n):
                raise ContractViolation(f"enqueueV3 with no (null) address for tensor {n!r}: every input and output "
                                        "needs a non-null, 256-byte-aligned address")
        self._check_memory(stream_handle)
        return shapes, dict(self.addresses)

    def _compute(self, shapes: dict, addresses: dict) -> None:
        feeds = {}
        for n in self.engine.inputs():
            bound = self.device.view(addresses[n], shapes[n], self.engine.io[n][1])
            feeds[n] = bound.to(self.engine.declared[n]).numpy().copy()  # a retyped input: the Cast reading it
        outputs = self.engine.session.run(None, feeds)
        for o, value in zip((x.name for x in self.engine.session.get_outputs()), outputs):
            dtype = self.engine.io[o][1]
            if tuple(value.shape) != tuple(shapes[o]):
                raise ContractViolation(f"output {o}: the context's shapes give {shapes[o]}, the network {value.shape}")
            self.device.view(addresses[o], shapes[o], dtype).copy_(torch.from_numpy(np.ascontiguousarray(value)))

    def execute_async_v3(self, stream_handle: int) -> bool:
        shapes, addresses = self._check_ready(stream_handle)
        capturing = self.device.capturing
        if capturing is not None:
            trt = self.engine.runtime.trt
            if trt.fail_in_capture is not None:  # a kernel that fails to enqueue while capturing: False
                self.device.invalidate_capture(trt.fail_in_capture == "invalidate")
                trt.fail_in_capture = None
                return False
            graph, stream = capturing
            if stream.handle != stream_handle:
                raise ContractViolation("enqueueV3 on another stream than the one being captured")
            version = self.version

            def launch() -> None:
                if self.version != version:
                    raise ContractViolation("a CUDA graph replayed after its execution context was given other "
                                            "shapes, addresses or memory: use one execution context per captured graph")
                self._check_memory(stream_handle)
                self._compute(shapes, addresses)

            graph.launches.append(launch)
            return True
        self._compute(shapes, addresses)
        self.executions += 1
        return True


class FakeTensorRT:
    """The `tensorrt` module as the backend and the builder see it, over one `FakeCudaDevice`; `version` API_10 or
    API_11 (TensorRT 11: the deprecated names are gone)."""

    Logger = Logger
    NetworkDefinitionCreationFlag = NetworkDefinitionCreationFlag
    MemoryPoolType = MemoryPoolType
    BuilderFlag = BuilderFlag
    TensorIOMode = TensorIOMode
    DataType = DataType
    ExecutionContextAllocationStrategy = ExecutionContextAllocationStrategy

    def __init__(self, device: FakeCudaDevice, version: str = VERSION):
        self.device = device
        self.__version__ = version
        self.major = int(version.split(".")[0])
        self.loggers: list[Logger] = []  # every distinct logger handed to a builder, parser or runtime
        self.logger_warnings = 0
        self.fail_in_capture: str | None = None
        self.memory_streams: dict[int, tuple] = {}  # user-managed memory -> (stream its contexts use, its backing)
        self.live_contexts: weakref.WeakSet = weakref.WeakSet()
        for cls in (Builder, OnnxParser, Runtime):
            setattr(self, cls.__name__, type(cls.__name__, (cls,), {"trt": self}))

    def use_logger(self, logger: Logger) -> None:
        if not any(logger is seen for seen in self.loggers):
            self.loggers.append(logger)
            if len(self.loggers) > 1:
                self.logger_warnings += 1
                log.warning("[TRT] The logger passed into createInferRuntime differs from one already provided for an "
                            "existing builder, runtime, or refitter.")

    def activation_bytes(self) -> int:
        """Device memory that live execution contexts hold or were given for their activations (each allocation
        once, however many contexts share it)."""
        held = {}
        for context in list(self.live_contexts):
            if context.memory is not None and context.memory[1]:
                a = self.device._find(context.memory[0], 1)
                if a is not None:  # memory given once and freed since is not held
                    held[a.start] = a.nbytes
        return sum(held.values())

    def fail_next_enqueue_in_capture(self, mode: str = "invalidate") -> None:
        """The next enqueue inside a capture returns False: the capture is invalidated ("invalidate") or ends with
        a graph that must not be used ("report")."""
        if mode not in ("invalidate", "report"):
            raise ValueError(mode)
        self.fail_in_capture = mode
