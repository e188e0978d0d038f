"""Model sizes read off official state dicts: GPTArgs, MARArgs and VAEArgs from the tensor shapes.

Official checkpoints carry no usable config, so every size comes from a named key's shape. The one
size that shapes cannot tell is the number of attention heads (a fused qkv is (3D, D) for any head
count); it comes from an explicit override, else from the official model of the same width and depth
(`LLAMAGEN_HEADS`, `MAR_HEADS`), else loading stops and asks for the override.
"""
from __future__ import annotations

import dataclasses
import logging
import functools
import math
import re
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from reference.checkpoint import CheckpointError, load_state_strict
from reference.errors import Setting, spelled
from reference.gpt import GPT, GPT_PRESETS, GPTArgs, precompute_rope_2d
from reference.mar import MAR, Fusion, MARArgs
from reference.model import PRESETS
from reference.vae import VAE_PRESETS, AutoencoderKL, VAEArgs

log = logging.getLogger(__name__)

__all__ = ["LLAMAGEN_HEADS", "MAR_HEADS", "MAR_PATCH_SIZE", "MAR_VAE_STRIDE", "gpt_args_from_state", "mar_args_from_state",
           "vae_args_from_state", "shape_mismatches", "nearest_preset", "fit_args"]

# (dim, n_layer) -> n_head of LlamaGen's factories (autoregressive/models/gpt.py: GPT_B ... GPT_7B), and ours.
LLAMAGEN_HEADS: dict[tuple[int, int], int] = {
    (768, 12): 12, (1024, 24): 16, (1280, 36): 20, (1536, 48): 24, (2560, 48): 40,
    (2048, 22): 32, (3200, 24): 32, (4096, 32): 32,
    **{(a.dim, a.n_layer): a.n_head for a in GPT_PRESETS.values()}}
# (width, depth) -> heads of MAR's factories (mar_base 12, mar_large 16, mar_huge 16), read from our presets.
MAR_HEADS: dict[tuple[int, int], int] = {
    (c.mar.encoder_embed_dim, c.mar.encoder_depth): c.mar.encoder_num_heads for c in PRESETS.values()}
MAR_PATCH_SIZE = 1  # every published MAR (mar_base/large/huge on kl16): one latent pixel per token
MAR_VAE_STRIDE = 16  # kl16, the VAE of every published MAR: one latent pixel per 16 x 16 pixels
LLAMAGEN_VQ_STRIDE = 16  # LlamaGen's VQ tokenizer: one token per 16 x 16 pixels
LLAMAGEN_FILE = re.compile(r"_(\d+)(?:\.[A-Za-z]+)+$")  # c2i_B_256.pt, c2i_L_384.pt: the image size ends the name
VAE_RESOLUTION = 256  # nominal VAE input size: only places the level attention (official Encoder default)
NEAR_FIT_KEYS = 4  # a preset explains a failure only when at most this many keys misfit it (a damaged key or two)
ROPE_ATOL = 1e-5  # a stored RoPE table (older LlamaGen files) must equal the one computed from the sizes


def _shape(state: dict[str, Tensor], key: str, source: str) -> tuple[int, ...]:
    if key not in state:
        raise CheckpointError(f"{source}: cannot read the model size: key {key!r} is missing")
    return tuple(state[key].shape)


def _count(state: dict[str, Tensor], prefix: str) -> int:
    """Number of numbered children under `prefix` (e.g. "layers." -> 12): highest index + 1, 0 if none."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = [int(m.group(1)) for k in state if (m := pattern.match(k))]
    return max(found) + 1 if found else 0


def _args(cls, source: str, **kwargs):
    """Construct an args dataclass; its validation errors become CheckpointErrors naming the file."""
    try:
        return cls(**kwargs)
    except ValueError as exc:
        raise CheckpointError(f"{source}: the shapes give an invalid {cls.__name__}: {exc}") from None


def _heads(override: int | None, table: dict[tuple[int, int], int], width: int, depth: int, what: str,
           option: str, source: str) -> int:
    if override is not None:
        return int(override)
    if (width, depth) in table:
        return table[(width, depth)]
    raise CheckpointError(f"{source}: a {depth}-layer, {width}-wide {what} is not an official size, and attention "
                          "heads cannot be read from shapes; pass the head count (", Setting(option, "N"), ")")


# -- LlamaGen GPT ----------------------------------------------------------------------------------
def _block_size_from_name(source: str) -> int:
    """Image tokens of a LlamaGen GPT from its published file name (the weights do not hold them)."""
    match = LLAMAGEN_FILE.search(Path(source.split(" [", 1)[0]).name)  # a source may name its entry: "f.pt [model]"
    if match is None or int(match.group(1)) % LLAMAGEN_VQ_STRIDE:
        raise CheckpointError(f"{source}: the number of image tokens is not in the weights and the file name does not "
                              "end in the image size as LlamaGen names its files (c2i_B_256.pt, c2i_L_384.pt); "
                              "keep the published name, or give the D2C stage 2 that fixes it")
    grid = int(match.group(1)) // LLAMAGEN_VQ_STRIDE
    log.info("%s: %d x %d image tokens, from the image size %s in the file name", source, grid, grid, match.group(1))
    return grid * grid


def gpt_args_from_state(state: dict[str, Tensor], source: str, n_head: int | None = None,
                        block_size: int | None = None, rope: Tensor | None = None) -> GPTArgs:
    """GPTArgs of a LlamaGen c2i state dict (official keys).

    dim/vocab: tok_embeddings.weight (vocab, dim); classes: cls_embedding.embedding_table.weight has
    num_classes + 1 rows (the null class); layers: count of layers.N; SwiGLU width: w1's rows.
    block_size (image tokens) is not in the weights: `block_size`, else a stored RoPE table `rope`
    (older files: (1 + block_size, head_dim / 2, 2)), else the image size that ends LlamaGen's file names
    (`c2i_B_256.pt`: 16 x 16 tokens; `c2i_L_384.pt`: 24 x 24), else an error. Heads: `n_head`, else the stored
    RoPE table's head_dim, else LLAMAGEN_HEADS.
    """
    vocab, dim = _shape(state, "tok_embeddings.weight", source)
    rows, _ = _shape(state, "cls_embedding.embedding_table.weight", source)
    n_layer = _count(state, "layers.")
    if n_layer == 0:
        raise CheckpointError(f"{source}: no transformer layers (no 'layers.0.*' keys)")
    qkv = _shape(state, "layers.0.attention.wqkv.weight", source)[0]
    if qkv != 3 * dim:
        raise CheckpointError(f"{source}: layers.0.attention.wqkv.weight has {qkv} rows, not 3 x dim = {3 * dim}: "
                              "grouped-query attention (n_kv_head != n_head) is not supported")
    hidden = _shape(state, "layers.0.feed_forward.w1.weight", source)[0]
    if rope is not None and rope.dim() == 3 and rope.shape[-1] == 2:
        if n_head is None:
            n_head = dim // (2 * rope.shape[1])
        if block_size is None:
            block_size = rope.shape[0] - 1
        elif block_size != rope.shape[0] - 1:
            raise CheckpointError(f"{source}: freqs_cis covers {rope.shape[0] - 1} image tokens, "
                                  f"the stage 2 expects {block_size}")
    n_head = _heads(n_head, LLAMAGEN_HEADS, dim, n_layer, "LlamaGen GPT", "gpt_heads", source)
    if block_size is None:
        block_size = _block_size_from_name(source)
    base = dict(dim=dim, n_layer=n_layer, n_head=n_head, vocab_size=vocab, block_size=block_size,
                num_classes=rows - 1)
    args = _args(GPTArgs, source, **base)
    if args.ffn_hidden != hidden:  # LlamaGen rounds 8*dim/3 up to multiple_of; a larger round-up fits too
        args = _args(GPTArgs, source, **base, multiple_of=hidden)
        if args.ffn_hidden != hidden:
            raise CheckpointError(f"{source}: feed-forward width {hidden} does not follow LlamaGen's SwiGLU rule "
                                  f"for dim {dim} (at least {int(2 * 4 * dim / 3)})")
    if rope is not None and rope.dim() == 3 and not rope.is_meta:
        want = precompute_rope_2d(args.grid_size, args.head_dim, args.rope_base, args.cls_token_num)
        if rope.shape != want.shape or not torch.allclose(rope.float(), want, atol=ROPE_ATOL, rtol=0):
            raise CheckpointError(f"{source}: the stored freqs_cis is not the 2D RoPE table of {n_head} heads "
                                  f"over {args.block_size} tokens (base {args.rope_base})")
    return args


# -- MAR -------------------------------------------------------------------------------------------
def _fusion(state: dict[str, Tensor]) -> Fusion:
    """qformer: condition.queries; cross_attn: cross-attention sub-layers; none: neither (plain MAR)."""
    if "condition.queries" in state:
        return Fusion.QFORMER
    if any(".cross_attn." in k for k in state) or any(k.startswith("condition.") for k in state):
        return Fusion.CROSS_ATTN
    return Fusion.NONE


def mar_args_from_state(state: dict[str, Tensor], source: str, vae: VAEArgs | None = None,
                        heads: int | None = None, patch_size: int | None = None,
                        vae_stride: int | None = None) -> MARArgs:
    """MARArgs of a MAR state dict (official keys, plus the fusion weights of a D2C stage 2).

    width/classes: class_emb.weight; depths: encoder_blocks.N / decoder_blocks.N; decoder width:
    decoder_embed; MLP ratio: fc1 rows / width; tokens: diffusion_pos_embed_learned; buffer: the rest of
    encoder_pos_embed_learned; head: diffloss.net.input_proj (width) and res_blocks.N (depth). Fusion:
    condition.tok_embed (codebook + null row), condition.pos_embed (discrete tokens), condition.blocks.N
    (Q-Former depth). Heads: `heads`, else MAR_HEADS; the encoder, decoder and Q-Former share them, as in
    MAR's factories.

    Not in the weights: z_proj's input is vae_embed_dim * patch_size**2, and any split of it fits (16
    channels is patch 1 on a 16-channel VAE or patch 2 on a 4-channel one), and the VAE stride (hence
    img_size) is the VAE's. So the patch size is `patch_size`, else MAR_PATCH_SIZE (every published MAR),
    and the stride is the VAE's, else `vae_stride`, else MAR_VAE_STRIDE (kl16); a given VAE must agree
    with both, and the log says where each came from.
    """
    class_num, width = _shape(state, "class_emb.weight", source)
    token_dim = _shape(state, "z_proj.weight", source)[1]
    enc_depth, dec_depth = _count(state, "encoder_blocks."), _count(state, "decoder_blocks.")
    dec_width = _shape(state, "decoder_embed.weight", source)[0]
    mlp_hidden = _shape(state, "encoder_blocks.0.mlp.fc1.weight", source)[0]
    seq_len = _shape(state, "diffusion_pos_embed_learned", source)[1]
    buffer_size = _shape(state, "encoder_pos_embed_learned", source)[1] - seq_len
    head_width = _shape(state, "diffloss.net.input_proj.weight", source)[0]
    head_depth = _count(state, "diffloss.net.res_blocks.")
    seq_h = math.isqrt(seq_len)
    if seq_h * seq_h != seq_len:
        raise CheckpointError(f"{source}: diffusion_pos_embed_learned has {seq_len} tokens, not a square grid")
    n_heads = _heads(heads, MAR_HEADS, width, enc_depth, "MAR", "mar_heads", source)
    patch, embed_dim, stride = _mar_latent_sizes(token_dim, source, vae, patch_size, vae_stride)
    fusion = _fusion(state)
    extra = {}
    if fusion is not Fusion.NONE:
        codebook_rows = _shape(state, "condition.tok_embed.weight", source)[0]
        extra = dict(codebook_size=codebook_rows - 1, discrete_len=_shape(state, "condition.pos_embed", source)[1],
                     qformer_depth=_count(state, "condition.blocks.") if fusion is Fusion.QFORMER else 2)
    args = _args(MARArgs, source, img_size=seq_h * patch * stride, vae_stride=stride, patch_size=patch,
                 vae_embed_dim=embed_dim, encoder_embed_dim=width, encoder_depth=enc_depth,
                 encoder_num_heads=n_heads, decoder_embed_dim=dec_width, decoder_depth=dec_depth,
                 decoder_num_heads=n_heads, mlp_ratio=mlp_hidden / width, buffer_size=buffer_size,
                 class_num=class_num, diffloss_d=head_depth, diffloss_w=head_width, fusion=fusion,
                 qformer_num_heads=n_heads, **extra)
    if int(width * args.mlp_ratio) != mlp_hidden:
        raise CheckpointError(f"{source}: MLP width {mlp_hidden} is not a ratio of the width {width}")
    return args


def _mar_latent_sizes(token_dim: int, source: str, vae: VAEArgs | None, patch_size: int | None,
                      vae_stride: int | None) -> tuple[int, int, int]:
    """(patch_size, vae_embed_dim, vae_stride) of a MAR whose tokens have `token_dim` channels; see
    `mar_args_from_state`. Refuses a VAE that disagrees instead of re-deriving the patch from it."""
    patch = MAR_PATCH_SIZE if patch_size is None else patch_size
    patch_from = (("MAR's published patch size; ", Setting("mar_patch_size", "N"), " gives another")
                  if patch_size is None else (Setting("mar_patch_size"),))
    if patch < 1 or token_dim % (patch * patch):
        raise CheckpointError(f"{source}: tokens of {token_dim} channels are not a whole number of latent channels "
                              f"at patch size {patch} (", *patch_from, "): token channels = VAE channels x "
                              "patch_size^2")
    embed_dim = token_dim // (patch * patch)
    if vae is not None and vae.embed_dim != embed_dim:
        raise CheckpointError(f"{source}: tokens of {token_dim} channels at patch size {patch} (", *patch_from,
                              f") need a VAE with {embed_dim} latent channels, and the VAE has {vae.embed_dim}: pass "
                              "the VAE this MAR was trained with, or its patch size (", Setting("mar_patch_size", "N"),
                              ")")
    if vae is not None:
        if vae_stride is not None and vae_stride != vae.stride:
            raise CheckpointError(f"{source}: ", Setting("vae_stride", vae_stride),
                                  f" was given, and the VAE's stride is {vae.stride}")
        stride, stride_from = vae.stride, "the VAE's"
    elif vae_stride is not None:
        stride, stride_from = vae_stride, "vae_stride"
    else:
        stride, stride_from = MAR_VAE_STRIDE, "kl16's, MAR's published VAE; vae_stride=N gives another"
    log.info("%s: patch size %d (%s), %d latent channels, VAE stride %d (%s)", source, patch,
             spelled(*patch_from), embed_dim, stride, stride_from)
    return patch, embed_dim, stride


# -- KL VAE ----------------------------------------------------------------------------------------
def vae_args_from_state(state: dict[str, Tensor], source: str) -> VAEArgs:
    """VAEArgs of an AutoencoderKL state dict; a VAE_PRESETS entry when it builds the same shapes.

    latent channels: post_quant_conv; base width and input channels: encoder.conv_in; levels:
    encoder.down.N; ch_mult: each level's first conv width / base width; res blocks per level:
    encoder.down.0.block.N; level attention: encoder.down.N.attn / decoder.up.N.attn, placed at
    VAE_RESOLUTION / 2**N; variational: quant_conv gives 2 x latent channels.
    """
    embed_dim = _shape(state, "post_quant_conv.weight", source)[0]
    ch, in_channels = _shape(state, "encoder.conv_in.weight", source)[:2]
    levels = _count(state, "encoder.down.")
    if levels == 0:
        raise CheckpointError(f"{source}: no encoder levels (no 'encoder.down.0.*' keys)")
    ch_mult = tuple(_shape(state, f"encoder.down.{i}.block.0.conv1.weight", source)[0] // ch for i in range(levels))
    enc_attn = tuple(VAE_RESOLUTION >> i for i in range(levels) if f"encoder.down.{i}.attn.0.q.weight" in state)
    dec_attn = tuple(VAE_RESOLUTION >> i for i in range(levels) if f"decoder.up.{i}.attn.0.q.weight" in state)
    args = _args(VAEArgs, source, embed_dim=embed_dim, ch=ch, ch_mult=ch_mult,
                 num_res_blocks=_count(state, "encoder.down.0.block."), resolution=VAE_RESOLUTION,
                 in_channels=in_channels, out_ch=_shape(state, "decoder.conv_out.weight", source)[0],
                 attn_resolutions=enc_attn, decoder_attn_resolutions=dec_attn,
                 use_variational=_shape(state, "quant_conv.weight", source)[0] == 2 * embed_dim)
    shapes = _module_shapes(AutoencoderKL, args)
    for name, preset in VAE_PRESETS.items():  # same network, canonical arguments (e.g. unreached attention levels)
        if _preset_shapes("vae", name) == shapes:
            return dataclasses.replace(preset)
    return args


# -- fit of a state against candidate sizes ---------------------------------------------------------
_MODULES = {"gpt": GPT, "mar": MAR, "vae": AutoencoderKL}


def _module_shapes(cls: type[nn.Module], args) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in cls(args).state_dict().items()}


def _presets(kind: str) -> dict[str, object]:
    if kind == "gpt":
        return dict(GPT_PRESETS)
    if kind == "vae":
        return dict(VAE_PRESETS)
    return {name: c.mar for name, c in PRESETS.items()}


@functools.lru_cache(maxsize=None)
def _preset_shapes(kind: str, name: str) -> dict[str, tuple[int, ...]]:
    return _module_shapes(_MODULES[kind], _presets(kind)[name])


def shape_mismatches(module_shapes: dict[str, tuple[int, ...]], state: dict[str, Tensor]) -> int:
    """Keys that do not fit: missing, unexpected and mis-shaped ones, counted together."""
    missing = sum(k not in state for k in module_shapes)
    return missing + sum(k not in module_shapes or tuple(v.shape) != module_shapes[k] for k, v in state.items())


def nearest_preset(kind: str, state: dict[str, Tensor], vae: VAEArgs | None = None) -> tuple[str, object, int] | None:
    """(name, args, mismatches) of the preset size of `kind` ("gpt", "mar", "vae") that fits `state` best."""
    candidates = {name: a for name, a in _presets(kind).items()
                  if kind != "mar" or vae is None or (a.vae_embed_dim, a.vae_stride) == (vae.embed_dim, vae.stride)}
    scored = [(shape_mismatches(_preset_shapes(kind, name), state), name, a) for name, a in candidates.items()]
    if not scored:
        return None
    count, name, args = min(scored, key=lambda s: s[0])
    return name, args, count


def fit_args(kind: str, infer: Callable[[], object], state: dict[str, Tensor], source: str,
             vae: VAEArgs | None = None):
    """The sizes `infer()` reads off `state`, checked key by key against the module they build (on meta).

    When they do not fit, or cannot be read, the error names the keys that do not fit the nearest
    size: the inferred one, or a preset that misfits in at most NEAR_FIT_KEYS keys and fewer than the
    inferred size (a damaged key that a size is read from then shows as that one key, not as every
    key the wrong size would misfit).
    """
    try:
        args, error = infer(), None
        count = shape_mismatches(_module_shapes(_MODULES[kind], args), state)
        if count == 0:
            return args
    except CheckpointError as exc:
        args, error, count = None, exc, None
    near = nearest_preset(kind, state, vae)
    if near is not None and 0 < near[2] <= NEAR_FIT_KEYS and (count is None or near[2] < count):
        name, args, _ = near
        source = f"{source} (nearest size: {name})"
    elif error is not None:
        raise error
    with torch.device("meta"):
        module = _MODULES[kind](args)
    load_state_strict(module, state, source)  # raises, naming the keys
    return args
