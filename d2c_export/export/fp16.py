"""Mixed-precision FP16 graphs from the FP32 exports, with FP32 kept where FP16 breaks (precision is decided here,
in the graph: TensorRT deprecates its builder's FP16 flag).

The conversion is `onnxconverter_common.float16.convert_float_to_float16(keep_io_types=True)` with an
op block list and a node block list read off each graph. The rule that picks the FP32 nodes:

- ops: the normalisations (LayerNormalization; InstanceNormalization, which GroupNorm exports to;
  GroupNormalization), Softmax, Sin/Cos/Exp, and the converter's own default list (Resize, Range, ...);
- RMSNorm: each ReduceMean over `Mul(a, a)`, the square itself, and the chain (Add eps, Sqrt,
  Reciprocal/Div) up to the Mul or Div that scales `a`;
- attention scores: from each Softmax back through Mul/Div/Add/Sub/Where/Cast/Concat to the MatMuls Q.K^T
  (the gpt concatenates the scores over the cache and over the step's own keys);
- timestep embeddings: from each Sin/Cos back through the elementwise ops and casts to the graph input;
- casts to float (the converter cannot retype them) and, per stage, its spec's `fp32_heads` (outputs computed
  in FP32 from their last MatMul on: the gpt logits) and `fp32_tails` (outputs whose nodes after the last
  MatMul/Gemm stay FP32: the diffusion step's `guided_output` and `ddpm_step`, whose sqrt(1/alpha_bar) reaches
  about 2e4);
- data movement (Transpose, Reshape, Gather, Slice, ...) whose float inputs all come from FP32 nodes.

Two small passes around the converter (onnxconverter-common 1.16) keep that intent. Before it,
`_untie_initializers` gives FP32 nodes their own copy of a constant that FP16 nodes also read, and
removes the exporter's value_info of initializers; otherwise the converter casts FP32 weights to FP16.
After it, `_restore_fp32_paths` removes the FP32 -> FP16 -> FP32 casts that the converter puts between
consecutive FP32 nodes, and gives back the FP32 type of outputs made by FP32 nodes. So FP32 regions
stay FP32 end to end, and graph inputs and outputs keep their FP32/INT64 types: runtime feeds are the
same for both precisions. `check_precision` verifies the result with strict type inference.

onnxconverter-common is imported where a conversion starts (`converter`), so everything else here (and whatever
imports this module) works where it is not installed, as on a GPU machine without a package index.
"""
from __future__ import annotations

import logging
import time
import warnings
from collections import defaultdict
from pathlib import Path

import onnx
from onnx import TensorProto
from tqdm import tqdm

from d2c_export.engines import Engines
from d2c_export.errors import EngineError
from d2c_export.manifest import StageEntry
from d2c_export.export.onnx import EXTERNAL_DATA_BYTES, check_graph, entry_for, graph_name
from d2c_export.stages import StageSpec
from reference.files import directory_lock, publish_dir

log = logging.getLogger(__name__)

PRECISION = "fp16"
FP16_MAX = 65504.0  # largest finite float16: constants are clipped there, not at the converter's 1e4
FP32_OPS = ("LayerNormalization", "InstanceNormalization", "GroupNormalization", "Softmax", "Sin", "Cos", "Exp")
CONVERTER_MISSING = ("the FP16 graphs need onnxconverter-common, which is not installed: pip install "
                     "onnxconverter-common (without a package index: carry the wheel of scripts/fetch_wheels.sh)")

_LINEAR = {"MatMul", "Gemm"}
_NORM_CHAIN = {"Add", "Sqrt", "Reciprocal", "Div", "Mul"}
_SCORE_OPS = {"Mul", "Div", "Add", "Sub", "Where", "Cast", "Concat"}
_EMBED_OPS = {"Mul", "Div", "Cast", "Unsqueeze", "Expand", "Reshape", "Squeeze"}
_HEAD_OPS = {"Reshape", "Cast", "Transpose", "Squeeze", "Unsqueeze", "Identity"}
_MOVEMENT = {"Transpose", "Reshape", "Gather", "GatherElements", "GatherND", "Slice", "Squeeze", "Unsqueeze",
             "Concat", "Expand", "Identity", "Split", "Tile", "ScatterElements"}


def converter():
    """onnxconverter-common's `float16` module, or an EngineError naming the install when it is missing."""
    try:
        from onnxconverter_common import float16
    except ImportError:
        raise EngineError(CONVERTER_MISSING) from None
    return float16


class _Graph:
    """Producer/consumer maps of a graph's nodes, by tensor name."""

    def __init__(self, graph: onnx.GraphProto):
        self.nodes = list(graph.node)
        self.producer = {o: n for n in self.nodes for o in n.output if o}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for n in self.nodes:
            for i in n.input:
                self.consumers[i].append(n)
        self.floats = _float_names(graph)

    def ancestors(self, names: list[str]) -> set[str]:
        seen, stack = set(), [self.producer[n] for n in names if n in self.producer]
        while stack:
            node = stack.pop()
            if node.name not in seen:
                seen.add(node.name)
                stack += [self.producer[i] for i in node.input if i in self.producer]
        return seen

    def walk_back(self, start: onnx.NodeProto, through: set[str], stop_at: set[str] = frozenset()) -> set[str]:
        """Nodes reached backwards from `start`'s inputs through ops in `through`, plus the first `stop_at` ones."""
        seen, stack = set(), [self.producer[i] for i in start.input if i in self.producer]
        while stack:
            node = stack.pop()
            if node.name in seen or node.op_type not in through | stop_at:
                continue
            seen.add(node.name)
            if node.op_type not in stop_at:
                stack += [self.producer[i] for i in node.input if i in self.producer]
        return seen


def _float_names(graph: onnx.GraphProto) -> set[str]:
    values = list(graph.input) + list(graph.output) + list(graph.value_info)
    return ({v.name for v in values if v.type.tensor_type.elem_type == TensorProto.FLOAT}
            | {t.name for t in graph.initializer if t.data_type == TensorProto.FLOAT})


def _rms_norms(g: _Graph) -> set[str]:
    """ReduceMean(Mul(a, a)), its chain to the Mul/Div that scales `a`, and the square."""
    found = set()
    for mean in (n for n in g.nodes if n.op_type == "ReduceMean"):
        square = g.producer.get(mean.input[0])
        if square is None or square.op_type != "Mul" or square.input[0] != square.input[1]:
            continue
        a, chain, frontier = square.input[0], {square.name, mean.name}, list(mean.output)
        while frontier:
            node = next((c for c in g.consumers[frontier.pop()] if c.op_type in _NORM_CHAIN), None)
            if node is None:
                break
            chain.add(node.name)
            if node.op_type in ("Mul", "Div") and a in node.input:
                found |= chain
                break
            frontier = list(node.output)
    return found


def fp32_nodes(model: onnx.ModelProto, spec: StageSpec) -> set[str]:
    """Names of the nodes of `model` (the FP32 graph of the stage `spec`, shapes inferred) that stay FP32."""
    g = _Graph(model.graph)
    keep = {n.name for n in g.nodes if n.op_type in FP32_OPS}
    keep |= {n.name for n in g.nodes if n.op_type == "Cast"
             and any(a.name == "to" and a.i == TensorProto.FLOAT for a in n.attribute)}
    keep |= _rms_norms(g)
    for softmax in (n for n in g.nodes if n.op_type == "Softmax"):
        keep |= g.walk_back(softmax, _SCORE_OPS, stop_at=_LINEAR)
    for trig in (n for n in g.nodes if n.op_type in ("Sin", "Cos")):
        keep |= g.walk_back(trig, _EMBED_OPS)
    for out in spec.fp32_heads:
        keep |= g.walk_back(g.producer[out], _HEAD_OPS, stop_at=_LINEAR) | {g.producer[out].name}
    for out in spec.fp32_tails:
        upstream = g.ancestors([out])
        last = [n for n in g.nodes if n.op_type in _LINEAR and n.name in upstream][-1]
        keep |= upstream - g.ancestors([last.output[0]])
    changed = True
    while changed:  # data movement fed only by FP32 nodes stays FP32
        changed = False
        for n in g.nodes:
            inputs = [i for i in n.input if i in g.floats and i in g.producer]
            if n.name not in keep and n.op_type in _MOVEMENT and inputs \
                    and all(g.producer[i].name in keep for i in inputs):
                keep.add(n.name)
                changed = True
    return keep


def _untie_initializers(graph: onnx.GraphProto, blocked: set[str]) -> None:
    """Ready the graph for the converter: FP32 nodes get their own copy of a float initializer shared with FP16 nodes.

    Also drops the value_info of initializers (the exporter writes them), which would make the converter cast
    the weights of FP32 nodes to FP16 and back.
    """
    inits = {t.name: t for t in graph.initializer if t.data_type == TensorProto.FLOAT}
    keep_info = [v for v in graph.value_info if v.name not in inits]
    del graph.value_info[:]
    graph.value_info.extend(keep_info)
    readers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in set(node.input) & inits.keys():
            readers[name].append(node)
    for name, nodes in readers.items():
        fp32 = [n for n in nodes if n.name in blocked]
        if fp32 and len(fp32) < len(nodes):
            copy = onnx.TensorProto()
            copy.CopyFrom(inits[name])
            copy.name = f"{name}_fp32"
            graph.initializer.append(copy)
            for n in fp32:
                n.input[:] = [copy.name if i == name else i for i in n.input]


def _separate_outputs(graph: onnx.GraphProto) -> None:
    """Give each graph output that other nodes also read an Identity of its own (`mar_cached`'s new cache rows).

    The converter casts an FP16 graph output back to FP32 under the output's name, and the nodes that read that name
    then get the FP32 tensor where they expect FP16. After this the readers take the inner tensor, and only the
    Identity writes the output."""
    g = _Graph(graph)
    for out in graph.output:
        if out.name not in g.producer or not g.consumers[out.name]:
            continue
        inner = out.name + "_inner"
        producer = g.producer[out.name]
        producer.output[:] = [inner if o == out.name else o for o in producer.output]
        for reader in g.consumers[out.name]:
            reader.input[:] = [inner if i == out.name else i for i in reader.input]
        graph.node.append(onnx.helper.make_node("Identity", [inner], [out.name], name=f"{out.name}_output"))


def _cast_to(node: onnx.NodeProto) -> int | None:
    return next((a.i for a in node.attribute if a.name == "to"), None) if node.op_type == "Cast" else None


def _restore_fp32_paths(model: onnx.ModelProto, blocked: set[str], float_outputs: set[str]) -> None:
    """Remove FP32 -> FP16 -> FP32 cast round trips and give `float_outputs` back their FP32 type.

    `blocked`: names of the nodes the converter kept in FP32 (its node and op block lists).
    """
    graph = model.graph
    g = _Graph(graph)
    source_types = {t.name: t.data_type for t in graph.initializer}
    source_types.update({v.name: v.type.tensor_type.elem_type for v in graph.input})

    def is_fp32(name: str) -> bool:
        node = g.producer.get(name)
        if node is None:
            return source_types.get(name) == TensorProto.FLOAT
        return _cast_to(node) == TensorProto.FLOAT or (node.op_type != "Cast" and node.name in blocked)

    for up in g.nodes:  # Cast(to fp16) of an FP32 tensor, read by Cast(to fp32): readers take the FP32 tensor
        if _cast_to(up) != TensorProto.FLOAT16 or not is_fp32(up.input[0]):
            continue
        for down in list(g.consumers[up.output[0]]):
            if _cast_to(down) == TensorProto.FLOAT and down.output[0] not in float_outputs:
                for reader in g.consumers[down.output[0]]:
                    reader.input[:] = [up.input[0] if i == down.output[0] else i for i in reader.input]
    g = _Graph(graph)
    for out in graph.output:
        if out.name not in float_outputs or out.type.tensor_type.elem_type == TensorProto.FLOAT:
            continue
        last = g.producer[out.name]
        if _cast_to(last) == TensorProto.FLOAT16 and is_fp32(last.input[0]) and last.input[0] in g.producer \
                and not g.consumers[out.name]:
            source = g.producer[last.input[0]]
            source.output[:] = [out.name if o == last.input[0] else o for o in source.output]
            for reader in g.consumers[last.input[0]]:
                reader.input[:] = [out.name if i == last.input[0] else i for i in reader.input]
            graph.node.remove(last)
        else:
            last.output[:] = [out.name + "_fp16" if o == out.name else o for o in last.output]
            for reader in g.consumers[out.name]:
                reader.input[:] = [out.name + "_fp16" if i == out.name else i for i in reader.input]
            graph.node.append(onnx.helper.make_node("Cast", [out.name + "_fp16"], [out.name], to=TensorProto.FLOAT,
                                                    name=f"{out.name}_to_fp32"))
        out.type.tensor_type.elem_type = TensorProto.FLOAT
    _drop_dead_casts(graph)
    del graph.value_info[:]  # stale after the rewiring; shape inference recomputes it


def _drop_dead_casts(graph: onnx.GraphProto) -> None:
    outputs = {o.name for o in graph.output}
    while True:
        used = {i for n in graph.node for i in n.input} | outputs
        dead = [n for n in graph.node if n.op_type == "Cast" and not any(o in used for o in n.output)]
        if not dead:
            return
        for n in dead:
            graph.node.remove(n)


def convert_graph(src: Path, dst: Path, spec: StageSpec) -> set[str]:
    """Write the mixed-precision graph of the FP32 graph `src` to `dst` (+ `.data` if large); returns the FP32 nodes."""
    float16 = converter()
    op_block_list = sorted(set(FP32_OPS) | set(float16.DEFAULT_OP_BLOCK_LIST))  # with the converter's defaults
    structure = onnx.load(str(src), load_external_data=False)
    _separate_outputs(structure.graph)
    structure = onnx.shape_inference.infer_shapes(structure)  # works on >2 GB graphs: weights are not loaded
    keep = fp32_nodes(structure, spec)
    onnx.external_data_helper.load_external_data_for_model(structure, str(src.parent))
    blocked = keep | {n.name for n in structure.graph.node if n.op_type in op_block_list}
    _untie_initializers(structure.graph, blocked)
    float_outputs = {o.name for o in structure.graph.output if o.type.tensor_type.elem_type == TensorProto.FLOAT}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # per-constant clipping notices; FP16_MAX clips only true overflows
        model = float16.convert_float_to_float16(
            structure, max_finite_val=FP16_MAX, keep_io_types=True, disable_shape_infer=True,
            op_block_list=op_block_list, node_block_list=sorted(keep))
    _restore_fp32_paths(model, blocked, float_outputs)
    size = sum(len(t.raw_data) for t in model.graph.initializer)
    onnx.save_model(model, str(dst), save_as_external_data=size > EXTERNAL_DATA_BYTES, all_tensors_to_one_file=True,
                    location=dst.name + ".data")
    return keep


def check_precision(path: Path, keep: set[str]) -> onnx.ModelProto:
    """Strict type inference of the converted graph; every kept node reads and writes FP32, no FP16 at the IO."""
    model = onnx.load(str(path), load_external_data=False)
    try:
        inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except Exception as exc:  # onnx raises InferenceError and friends
        raise EngineError(f"{path.name}: the FP16 graph does not type-check ({str(exc).splitlines()[0]})") from None
    types = {v.name: v.type.tensor_type.elem_type for v in
             list(inferred.graph.input) + list(inferred.graph.output) + list(inferred.graph.value_info)}
    types.update({t.name: t.data_type for t in inferred.graph.initializer})
    for v in list(inferred.graph.input) + list(inferred.graph.output):
        if v.type.tensor_type.elem_type == TensorProto.FLOAT16:
            raise EngineError(f"{path.name}: graph input/output {v.name} is FP16; feeds must stay FP32")
    for node in inferred.graph.node:
        if node.name in keep:
            half = [t for t in list(node.input) + list(node.output) if types.get(t) == TensorProto.FLOAT16]
            if half:
                raise EngineError(f"{path.name}: node {node.name} ({node.op_type}) should be FP32 but has FP16 {half}")
    return inferred


def convert_stage(engines: Engines, spec: StageSpec) -> StageEntry:
    """Convert the FP32 graph of `spec` in `engines` to `<stage>.fp16.onnx`; returns its manifest entry."""
    src = engines.entry(spec.name, "onnx-fp32")
    main = graph_name(spec.name, PRECISION)
    with publish_dir(engines.directory, f"{spec.name}.{PRECISION}") as (tmp, digests):
        keep = convert_graph(engines.file(spec.name, "onnx-fp32"), tmp / main, spec)
        check_graph(tmp / main, spec, engines.config)
        check_precision(tmp / main, keep)
    return entry_for(digests, main, spec, engines.config, PRECISION, src.opset, src.profile)


def convert_engines(engines: Engines, stages: str | list[str] = "all", progress: bool = True) -> None:
    """Write `<stage>.fp16.onnx` next to every exported FP32 graph and record them as kind `onnx-fp16`."""
    with directory_lock(engines.directory, "an FP16 conversion"):
        _convert_locked(engines, stages, progress)


def _convert_locked(engines: Engines, stages: str | list[str], progress: bool) -> None:
    converter()  # before any work
    bar = tqdm(engines.specs(stages, kind="onnx-fp32"), desc="fp16", unit="stage", disable=not progress)
    for spec in bar:
        bar.set_postfix_str(spec.name)
        start = time.perf_counter()
        entry = convert_stage(engines, spec)
        engines.manifest.stages.setdefault(spec.name, {})[f"onnx-{PRECISION}"] = entry
        engines.manifest.save(engines.directory)
        log.info("converted %s to fp16 in %.1f s -> %s", spec.name, time.perf_counter() - start, entry.main_file)
