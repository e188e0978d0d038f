"""One `StageSpec` per exported stage: wrapper, tensors, dynamic axes, examples, profiles, tolerances.

Export, the engine build, buffer allocation, the runtime and the parity tests all read this registry:
adding a stage is adding one spec.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from reference.diffusion import NUM_COEFS, DenoiseStep, make_tables
from reference.mar import Fusion
from reference.model import D2C, D2CConfig

DEFAULT_MAX_BATCH = 16  # images per call the exported profiles admit (CFG doubles the rows)


@dataclass(frozen=True)
class TensorSpec:
    """A graph input or output. `shape` entries are ints (static) or axis names (dynamic)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int | str, ...]

    @property
    def dynamic_axes(self) -> dict[int, str]:
        return {i: d for i, d in enumerate(self.shape) if isinstance(d, str)}


@dataclass(frozen=True)
class Tolerance:
    """Parity limits of a stage output against the reference, scale-free so large latents compare fairly."""

    max_rel: float  # max |a - b| / max |b|
    rel_l2: float  # ||a - b|| / ||b||
    min_cosine: float


FP32_TOLERANCE = Tolerance(max_rel=1e-5, rel_l2=1e-5, min_cosine=0.999999)
FP16_TOLERANCE = Tolerance(max_rel=5e-2, rel_l2=1e-2, min_cosine=0.999)


@dataclass(frozen=True)
class StageSpec:
    """Everything the toolchain needs to know about one stage."""

    name: str
    runs: str  # when the runtime calls it
    inputs: Callable[[D2CConfig], tuple[TensorSpec, ...]]
    outputs: Callable[[D2CConfig], tuple[TensorSpec, ...]]
    wrapper: Callable[[D2C], nn.Module]
    axes: Callable[[D2CConfig, int], dict[str, tuple[int, int, int]]]  # axis -> (min, opt, max)
    example: Callable[[D2CConfig, dict[str, int], torch.Generator], dict[str, Tensor]]
    applies: Callable[[D2CConfig], bool] = lambda config: True
    tolerance: Tolerance = FP32_TOLERANCE
    varargs_from: int | None = None  # inputs from this index on are the wrapper's *args (the gpt's per-layer caches)

    def input_specs(self, config: D2CConfig) -> tuple[TensorSpec, ...]:
        return self.inputs(config)

    def output_specs(self, config: D2CConfig) -> tuple[TensorSpec, ...]:
        return self.outputs(config)

    def profile(self, config: D2CConfig, max_batch: int = DEFAULT_MAX_BATCH) -> dict[str, tuple[int, int, int]]:
        return self.axes(config, max_batch)

    def example_inputs(self, config: D2CConfig, sizes: dict[str, int] | None = None,
                       seed: int = 0) -> dict[str, Tensor]:
        """Inputs of realistic range; `sizes` overrides the profile's opt sizes (export uses opt)."""
        opt = {axis: o for axis, (_, o, _) in self.profile(config).items()}
        return self.example(config, {**opt, **(sizes or {})}, torch.Generator().manual_seed(seed))


# -- wrappers: one tensor-in, tensor-out forward per stage -------------------------------------------
class MarStage(nn.Module):
    """The `mar` stage; plain MAR has no fusion input."""

    def __init__(self, model: D2C):
        super().__init__()
        self.mar = model.mar

    def forward(self, tokens: Tensor, kept: Tensor, pred: Tensor, labels: Tensor,
                fusion: Tensor | None = None) -> Tensor:
        return self.mar(tokens, kept, pred, labels, fusion)


# -- gpt -------------------------------------------------------------------------------------------
class GptStage(nn.Module):
    """The `gpt` stage with one cache input per layer, keys first: a graph that sliced one stacked cache into
    layers would copy the whole cache on every decode step (ONNX has no views), while per-layer inputs are
    read in place. The runtime binds the layers of its stacked cache (`GraphStages.gpt`)."""

    def __init__(self, model: D2C):
        super().__init__()
        self.gpt = model.gpt

    def forward(self, ids: Tensor, input_pos: Tensor, *caches: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        n = self.gpt.args.n_layer
        return self.gpt(ids, input_pos, caches[:n], caches[n:])


def gpt_cache_names(c: D2CConfig) -> list[str]:
    """The per-layer cache inputs of the gpt graph: k_cache_0 .. k_cache_{L-1}, then v_cache_0 .. v_cache_{L-1}."""
    return [f"{kv}_cache_{i}" for kv in "kv" for i in range(c.gpt.n_layer)]


def _gpt_layer_cache_spec(c: D2CConfig, name: str) -> TensorSpec:
    g = c.gpt
    return TensorSpec(name, torch.float32, ("rows", g.n_head, g.max_seq_len, g.head_dim))


def _gpt_new_spec(c: D2CConfig, name: str) -> TensorSpec:
    g = c.gpt
    return TensorSpec(name, torch.float32, (g.n_layer, "rows", g.n_head, "tokens", g.head_dim))


def _gpt_example(c: D2CConfig, s: dict[str, int], gen: torch.Generator) -> dict[str, Tensor]:
    g = c.gpt
    rows, tokens = s["rows"], s["tokens"]
    start = int(torch.randint(0, g.max_seq_len - tokens + 1, (1,), generator=gen))
    ids = torch.randint(0, g.vocab_size, (rows, tokens), generator=gen)
    if start == 0:
        ids[:, 0] = torch.randint(0, g.num_classes + 1, (rows,), generator=gen)
    shape = (rows, g.n_head, g.max_seq_len, g.head_dim)
    caches = {name: torch.randn(shape, generator=gen) for name in gpt_cache_names(c)}
    return {"ids": ids, "input_pos": torch.arange(start, start + tokens), **caches}


GPT = StageSpec(
    name="gpt",
    runs="once per token: prefill of the class token, then one-token decode steps with the KV cache; the cache "
         "is an input only, the step's keys and values come out and the runtime writes them into it",
    inputs=lambda c: (TensorSpec("ids", torch.int64, ("rows", "tokens")),
                      TensorSpec("input_pos", torch.int64, ("tokens",)),
                      *(_gpt_layer_cache_spec(c, name) for name in gpt_cache_names(c))),
    outputs=lambda c: (TensorSpec("logits", torch.float32, ("rows", "tokens", c.gpt.vocab_size)),
                       _gpt_new_spec(c, "k_new"), _gpt_new_spec(c, "v_new")),
    wrapper=GptStage,
    axes=lambda c, b: {"rows": (1, 2, 2 * b), "tokens": (1, 2, c.gpt.max_seq_len)},
    example=_gpt_example,
    applies=lambda c: c.gpt is not None,
    varargs_from=2,
)


# -- cond ------------------------------------------------------------------------------------------
def _cond_width(c: D2CConfig) -> int:
    return c.mar.buffer_size if c.mar.fusion is Fusion.QFORMER else c.mar.discrete_len


COND = StageSpec(
    name="cond",
    runs="once per image: discrete ids (null ids for the unconditional rows) -> fusion features",
    inputs=lambda c: (TensorSpec("discrete_ids", torch.int64, ("rows", c.mar.discrete_len)),),
    outputs=lambda c: (TensorSpec("fusion", torch.float32, ("rows", _cond_width(c), c.mar.encoder_embed_dim)),),
    wrapper=lambda m: m.mar.condition,
    axes=lambda c, b: {"rows": (1, 2, 2 * b)},
    example=lambda c, s, gen: {"discrete_ids": torch.randint(0, c.mar.codebook_size + 1,
                                                             (s["rows"], c.mar.discrete_len), generator=gen)},
    applies=lambda c: c.mar.fusion is not Fusion.NONE,
)


# -- mar -------------------------------------------------------------------------------------------
def _mar_inputs(c: D2CConfig) -> tuple[TensorSpec, ...]:
    m = c.mar
    specs = (TensorSpec("tokens", torch.float32, ("rows", m.seq_len, m.token_dim)),
             TensorSpec("kept", torch.int64, ("rows", "kept_len")),
             TensorSpec("pred", torch.int64, ("rows", "pred_len")),
             TensorSpec("labels", torch.int64, ("rows",)))
    if m.fusion is Fusion.NONE:
        return specs
    return specs + (TensorSpec("fusion", torch.float32, ("rows", _cond_width(c), m.encoder_embed_dim)),)


def _mar_example(c: D2CConfig, s: dict[str, int], gen: torch.Generator) -> dict[str, Tensor]:
    m = c.mar
    rows, kept_len, pred_len = s["rows"], s["kept_len"], s["pred_len"]
    if kept_len + pred_len > m.seq_len:
        raise ValueError(f"kept_len + pred_len must be <= {m.seq_len}")
    order = torch.stack([torch.randperm(m.seq_len, generator=gen) for _ in range(rows)])
    feeds = {"tokens": torch.randn(rows, m.seq_len, m.token_dim, generator=gen),
             "kept": order[:, :kept_len].sort(-1).values, "pred": order[:, kept_len:kept_len + pred_len].sort(-1).values,
             "labels": torch.randint(0, m.class_num + 1, (rows,), generator=gen)}
    if m.fusion is not Fusion.NONE:
        feeds["fusion"] = torch.randn(rows, _cond_width(c), m.encoder_embed_dim, generator=gen)
    return feeds


MAR = StageSpec(
    name="mar",
    runs="once per masked step: encoder over the kept tokens, decoder -> conditions of the tokens to predict",
    inputs=_mar_inputs,
    outputs=lambda c: (TensorSpec("z", torch.float32, ("rows", "pred_len", c.mar.decoder_embed_dim)),),
    wrapper=MarStage,
    axes=lambda c, b: {"rows": (1, 2, 2 * b), "kept_len": (0, c.mar.seq_len // 2, c.mar.seq_len - 1),
                       "pred_len": (1, max(2, c.mar.seq_len // 8), c.mar.seq_len)},
    example=_mar_example,
)


# -- diffusion -------------------------------------------------------------------------------------
def _diffusion_example(c: D2CConfig, s: dict[str, int], gen: torch.Generator) -> dict[str, Tensor]:
    m, n = c.mar, s["n"]
    tables = make_tables(100)
    index = int(torch.randint(0, tables.num_timesteps, (1,), generator=gen))
    groups = max(1, s["m"] // n)
    return {"x": torch.randn(n, m.token_dim, generator=gen) * 3.0,
            "t": torch.tensor([tables.model_timestep(index)]),
            "z": torch.randn(groups * n, m.decoder_embed_dim, generator=gen),
            "noise": torch.randn(n, m.token_dim, generator=gen),
            "cfg": torch.tensor([4.0]), "temperature": torch.tensor([1.0]),
            "coefs": tables.coefficients(index)}


DIFFUSION = StageSpec(
    name="diffusion",
    runs="once per denoising step: head with guidance, then the DDPM posterior update",
    inputs=lambda c: (TensorSpec("x", torch.float32, ("n", c.mar.token_dim)),
                      TensorSpec("t", torch.int64, (1,)),
                      TensorSpec("z", torch.float32, ("m", c.mar.decoder_embed_dim)),
                      TensorSpec("noise", torch.float32, ("n", c.mar.token_dim)),
                      TensorSpec("cfg", torch.float32, (1,)),
                      TensorSpec("temperature", torch.float32, (1,)),
                      TensorSpec("coefs", torch.float32, (NUM_COEFS,))),
    outputs=lambda c: (TensorSpec("x_prev", torch.float32, ("n", c.mar.token_dim)),),
    wrapper=lambda m: DenoiseStep(m.mar.diffloss.net),
    axes=lambda c, b: {"n": (1, 16, b * c.mar.seq_len), "m": (1, 32, 2 * b * c.mar.seq_len)},
    example=_diffusion_example,
)


# -- vae -------------------------------------------------------------------------------------------
def _latent_hw(c: D2CConfig) -> int:
    return c.image_size // c.vae.stride


VAE = StageSpec(
    name="vae",
    runs="once per image: latents -> pixels in [-1, 1]",
    inputs=lambda c: (TensorSpec("latents", torch.float32, ("batch", c.vae.embed_dim, _latent_hw(c), _latent_hw(c))),),
    outputs=lambda c: (TensorSpec("images", torch.float32, ("batch", 3, c.image_size, c.image_size)),),
    wrapper=lambda m: m.vae,
    axes=lambda c, b: {"batch": (1, 2, b)},
    example=lambda c, s, gen: {"latents": torch.randn(s["batch"], c.vae.embed_dim, _latent_hw(c), _latent_hw(c),
                                                      generator=gen)},
)


STAGES: dict[str, StageSpec] = {spec.name: spec for spec in (GPT, COND, MAR, DIFFUSION, VAE)}


def stages_for(config: D2CConfig, names: str | list[str] = "all") -> list[StageSpec]:
    """The specs that apply to `config`, in run order; 'all' or a list of names."""
    wanted = list(STAGES) if names == "all" else ([names] if isinstance(names, str) else list(names))
    unknown = [n for n in wanted if n not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; choose from: all, {', '.join(STAGES)}")
    chosen = [STAGES[n] for n in wanted if STAGES[n].applies(config)]
    if names != "all" and len(chosen) != len(wanted):
        skipped = [n for n in wanted if not STAGES[n].applies(config)]
        raise ValueError(f"stage(s) {skipped} do not exist for config {config.name!r} (fusion "
                         f"{config.mar.fusion.value})")
    return chosen
