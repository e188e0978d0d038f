"""The whole D2C generator: one config of its parts, the named presets, and the module holding them."""
from __future__ import annotations

import dataclasses
import enum
import types
import typing
from dataclasses import dataclass

from torch import nn

from reference.gpt import GPT, GPT_PRESETS, GPTArgs
from reference.json_files import Bool, Int, ListOf, Maybe, Num, Obj, Schema, Str
from reference.mar import MAR, Fusion, MARArgs
from reference.vae import VAE_PRESETS, AutoencoderKL, VAEArgs


@dataclass
class D2CConfig:
    """Sizes of every part. `gpt` is None for plain MAR (fusion "none": no discrete stage)."""

    name: str
    mar: MARArgs
    vae: VAEArgs
    gpt: GPTArgs | None = None

    def __post_init__(self) -> None:
        m, v, g = self.mar, self.vae, self.gpt
        if m.vae_embed_dim != v.embed_dim:
            raise ValueError(f"mar.vae_embed_dim {m.vae_embed_dim} != vae.embed_dim {v.embed_dim}")
        if m.vae_stride != v.stride:
            raise ValueError(f"mar.vae_stride {m.vae_stride} != the VAE's stride {v.stride}")
        if (m.fusion is Fusion.NONE) != (g is None):
            raise ValueError("a discrete stage (gpt) is needed exactly when fusion is not 'none'")
        if g is not None:
            if g.vocab_size != m.codebook_size or g.block_size != m.discrete_len:
                raise ValueError(f"gpt vocab/tokens ({g.vocab_size}, {g.block_size}) != mar codebook/discrete_len "
                                 f"({m.codebook_size}, {m.discrete_len})")
            if g.num_classes != m.class_num:
                raise ValueError(f"gpt.num_classes {g.num_classes} != mar.class_num {m.class_num}")

    @property
    def num_classes(self) -> int:
        return self.mar.class_num

    @property
    def image_size(self) -> int:
        return self.mar.img_size

    def to_dict(self) -> dict:
        return {"name": self.name, "mar": _as_dict(self.mar), "vae": _as_dict(self.vae),
                "gpt": None if self.gpt is None else _as_dict(self.gpt)}

    @classmethod
    def from_dict(cls, d: dict) -> "D2CConfig":
        """The config of `to_dict`'s form; its shape is `CONFIG_SCHEMA`'s (checked by whoever read it from a file)."""
        vae = dict(d["vae"])
        for key in ("ch_mult", "attn_resolutions"):
            if key in vae:
                vae[key] = tuple(vae[key])
        return cls(name=d["name"], mar=MARArgs(**d["mar"]), vae=VAEArgs(**vae),
                   gpt=None if d.get("gpt") is None else GPTArgs(**d["gpt"]))


MAX_CONFIG_INT = 1 << 20  # no size of a config is larger (widths, depths, classes, vocabularies, pixels)


def _schema_of(kind) -> Schema:
    """The JSON schema of one dataclass field's type, as `to_dict` writes it."""
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        (inner,) = [k for k in typing.get_args(kind) if k is not type(None)]
        return Maybe(_schema_of(inner))
    if typing.get_origin(kind) is tuple:
        return ListOf(_schema_of(typing.get_args(kind)[0]), max_len=64)
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        return Str(choices=[e.value for e in kind])
    return {bool: Bool(), int: Int(0, MAX_CONFIG_INT), float: Num(), str: Str(max_len=256)}[kind]


def _args_schema(cls) -> Obj:
    hints = typing.get_type_hints(cls)
    fields = {f.name: _schema_of(hints[f.name]) for f in dataclasses.fields(cls)}
    required = {f.name: fields[f.name] for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    return Obj(required, {k: v for k, v in fields.items() if k not in required})


# A config as JSON (the manifest's `config`, a checkpoint's `d2c_config`): every field of the dataclasses, typed.
CONFIG_SCHEMA = Obj({"name": Str(max_len=256), "mar": _args_schema(MARArgs), "vae": _args_schema(VAEArgs)},
                    {"gpt": Maybe(_args_schema(GPTArgs))})


def _as_dict(obj) -> dict:
    out = dataclasses.asdict(obj)
    return {k: (v.value if isinstance(v, Fusion) else v) for k, v in out.items()}


def _mar_size(width: int, depth: int, heads: int, head_depth: int, head_width: int, **kw) -> MARArgs:
    return MARArgs(encoder_embed_dim=width, encoder_depth=depth, encoder_num_heads=heads,
                   decoder_embed_dim=width, decoder_depth=depth, decoder_num_heads=heads,
                   diffloss_d=head_depth, diffloss_w=head_width, qformer_num_heads=heads, **kw)


def _tiny(fusion: Fusion) -> D2CConfig:
    vae = VAE_PRESETS["vae-tiny"]
    mar = MARArgs(img_size=16, vae_stride=vae.stride, patch_size=2, vae_embed_dim=vae.embed_dim,
                  encoder_embed_dim=32, encoder_depth=1, encoder_num_heads=2,
                  decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, mlp_ratio=2.0,
                  buffer_size=4, class_num=10, diffloss_d=1, diffloss_w=32, fusion=fusion,
                  codebook_size=64, discrete_len=16, qformer_depth=1, qformer_num_heads=2)
    gpt = None if fusion is Fusion.NONE else GPT_PRESETS["gpt-tiny"]
    return D2CConfig("d2c-tiny" if fusion is Fusion.QFORMER else f"d2c-tiny-{fusion.value}", mar, vae, gpt)


def _demo() -> D2CConfig:
    """Sized for the synthetic shapes (training.data) at 16x16, trainable on a CPU (scripts/train_demo.py)."""
    vae = VAEArgs(embed_dim=4, ch=32, ch_mult=(1, 2), num_res_blocks=1, resolution=16, attn_resolutions=())
    mar = MARArgs(img_size=16, vae_stride=vae.stride, patch_size=2, vae_embed_dim=vae.embed_dim,
                  encoder_embed_dim=64, encoder_depth=2, encoder_num_heads=4,
                  decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4, mlp_ratio=4.0,
                  buffer_size=4, class_num=10, diffloss_d=3, diffloss_w=128, fusion=Fusion.QFORMER,
                  codebook_size=64, discrete_len=16, qformer_depth=1, qformer_num_heads=4)
    gpt = GPTArgs(dim=64, n_layer=2, n_head=2, vocab_size=64, block_size=16, num_classes=10, multiple_of=32)
    return D2CConfig("d2c-demo", mar, vae, gpt)


def _full(name: str, mar: MARArgs) -> D2CConfig:
    return D2CConfig(name, mar, VAE_PRESETS["kl16"], GPT_PRESETS["gpt-b"])


PRESETS: dict[str, D2CConfig] = {
    "d2c-tiny": _tiny(Fusion.QFORMER),
    "d2c-tiny-cross_attn": _tiny(Fusion.CROSS_ATTN),
    "d2c-tiny-none": _tiny(Fusion.NONE),
    "d2c-demo": _demo(),
    "d2c-b": _full("d2c-b", _mar_size(768, 12, 12, 6, 1024)),
    "d2c-l": _full("d2c-l", _mar_size(1024, 16, 16, 8, 1280)),
    "d2c-h": _full("d2c-h", _mar_size(1280, 20, 16, 12, 1536)),
    "mar-b": D2CConfig("mar-b", _mar_size(768, 12, 12, 6, 1024, fusion=Fusion.NONE), VAE_PRESETS["kl16"]),
    "mar-l": D2CConfig("mar-l", _mar_size(1024, 16, 16, 8, 1280, fusion=Fusion.NONE), VAE_PRESETS["kl16"]),
    "mar-h": D2CConfig("mar-h", _mar_size(1280, 20, 16, 12, 1536, fusion=Fusion.NONE), VAE_PRESETS["kl16"]),
}


# Sampling settings a preset needs other than SamplingParams' ImageNet defaults; exported engines record them so that
# `d2c-run` works on every model without flags. The demo has 16 latent tokens, and its small diffusion head is not
# precise enough near t = 999 (where the cosine schedule's sqrt(1 / alpha_bar) reaches 2e4) for coarser respacings
# than about 250 steps, which blow up; at 250 the demo's quality gate fails (5.6 accuracy points below its 500 steps,
# 3 allowed) and at 300 it holds (0.4 below; README, "Fast samplers"), so annealing the denoising steps stops at 300.
# It was trained without guidance in mind.
RECOMMENDED_SAMPLING: dict[str, dict] = {
    "d2c-demo": {"cfg": 1.0, "num_iter": 16, "diffusion_steps": 500, "diffusion_floor": 300},
}


def get_config(name: str) -> D2CConfig:
    """A fresh copy of a named preset; unknown names list the choices."""
    if name not in PRESETS:
        raise KeyError(f"unknown config {name!r}; choose one of: {', '.join(PRESETS)}")
    return D2CConfig.from_dict(PRESETS[name].to_dict())


class D2C(nn.Module):
    """Holds the parts; sampling lives in `reference.pipeline`, never in the networks."""

    def __init__(self, config: D2CConfig):
        super().__init__()
        self.config = config
        self.gpt = None if config.gpt is None else GPT(config.gpt)
        self.mar = MAR(config.mar)
        self.vae = AutoencoderKL(config.vae)

