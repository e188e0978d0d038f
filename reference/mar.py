"""The continuous stage: MAR's masked encoder/decoder with D2C's fusion of the discrete tokens."""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reference.diffusion_head import DiffLoss, HeadArgs


class Fusion(str, Enum):
    QFORMER = "qformer"  # learned queries read the discrete tokens; added to the class buffer slots
    CROSS_ATTN = "cross_attn"  # every encoder/decoder block cross-attends to the discrete tokens
    NONE = "none"  # plain MAR


@dataclass
class MARArgs:
    img_size: int = 256
    vae_stride: int = 16
    patch_size: int = 1
    vae_embed_dim: int = 16
    encoder_embed_dim: int = 768
    encoder_depth: int = 12
    encoder_num_heads: int = 12
    decoder_embed_dim: int = 768
    decoder_depth: int = 12
    decoder_num_heads: int = 12
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    buffer_size: int = 64
    class_num: int = 1000
    diffloss_d: int = 6
    diffloss_w: int = 1024
    fusion: Fusion = Fusion.QFORMER
    codebook_size: int = 16384  # discrete vocabulary (stage 1's); id == codebook_size is the null token
    discrete_len: int = 256  # discrete tokens per image
    qformer_depth: int = 2
    qformer_num_heads: int = 12
    label_drop_prob: float = 0.1
    mask_ratio_min: float = 0.7
    diffusion_batch_mul: int = 4

    def __post_init__(self) -> None:
        self.fusion = Fusion(self.fusion)
        if self.img_size % (self.vae_stride * self.patch_size):
            raise ValueError(f"img_size {self.img_size} is not a multiple of vae_stride*patch_size")
        checks = [(self.encoder_embed_dim, self.encoder_num_heads), (self.decoder_embed_dim, self.decoder_num_heads)]
        if self.fusion is Fusion.QFORMER:
            checks.append((self.encoder_embed_dim, self.qformer_num_heads))
        for dim, heads in checks:
            if dim % heads:
                raise ValueError(f"width {dim} is not divisible by {heads} heads")

    @property
    def seq_h(self) -> int:
        return self.img_size // self.vae_stride // self.patch_size

    @property
    def seq_len(self) -> int:
        return self.seq_h * self.seq_h

    @property
    def token_dim(self) -> int:
        return self.vae_embed_dim * self.patch_size ** 2

    @property
    def null_class(self) -> int:
        return self.class_num

    @property
    def null_token(self) -> int:
        return self.codebook_size

    @property
    def head(self) -> HeadArgs:
        return HeadArgs(self.token_dim, self.decoder_embed_dim, self.diffloss_w, self.diffloss_d)


class Attention(nn.Module):
    """Multi-head attention with timm's key layout; `context` given: cross-attention (q from x, kv from it)."""

    def __init__(self, dim: int, num_heads: int, cross: bool = False, context_dim: int | None = None):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.cross = cross
        if cross:
            self.q = nn.Linear(dim, dim)
            self.kv = nn.Linear(context_dim or dim, 2 * dim)
        else:
            self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def _heads(self, t: Tensor) -> Tensor:
        b, n, _ = t.shape
        return t.reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, N, hd)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        if self.cross:
            q = self._heads(self.q(x))
            k, v = (self._heads(t) for t in self.kv(context).chunk(2, dim=-1))
        else:
            q, k, v = (self._heads(t) for t in self.qkv(x).chunk(3, dim=-1))
        return self.attend(q, k, v)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None = None) -> Tensor:
        """Heads q (B, H, N, hd) over keys and values (B, H, M, hd), `bias` added to the scores -> projected (B, N, D)."""
        scores = (q * self.head_dim ** -0.5) @ k.transpose(-2, -1)  # (B, H, N, M)
        if bias is not None:
            scores = scores + bias
        attn = scores.float().softmax(dim=-1).to(v.dtype)
        out = (attn @ v).transpose(1, 2)  # (B, N, H, hd)
        return self.proj(out.reshape(*out.shape[:2], -1))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """timm's pre-norm ViT block (norm1/attn/norm2/mlp), with an optional cross-attention sub-layer."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, eps: float, cross: bool = False,
                 context_dim: int | None = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads)
        if cross:
            self.norm_cross = nn.LayerNorm(dim, eps=eps)
            self.cross_attn = Attention(dim, num_heads, cross=True, context_dim=context_dim)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        x = x + self.attn(self.norm1(x))
        if context is not None:
            x = x + self.cross_attn(self.norm_cross(x), context)
        return x + self.mlp(self.norm2(x))


class DiscreteCondition(nn.Module):
    """The `cond` network: discrete ids (B, N) -> fusion features.

    qformer: (B, buffer_size, D) query outputs; cross_attn: (B, N, D) embedded discrete tokens.
    The null token (id == codebook_size) everywhere is the learned unconditional condition.
    """

    def __init__(self, args: MARArgs):
        super().__init__()
        dim = args.encoder_embed_dim
        self.fusion = args.fusion
        self.null_token = args.null_token
        self.tok_embed = nn.Embedding(args.codebook_size + 1, dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, args.discrete_len, dim))
        self.embed_norm = nn.LayerNorm(dim, eps=args.norm_eps)
        if self.fusion is Fusion.QFORMER:
            self.queries = nn.Parameter(torch.zeros(1, args.buffer_size, dim))
            self.blocks = nn.ModuleList(
                Block(dim, args.qformer_num_heads, args.mlp_ratio, args.norm_eps, cross=True)
                for _ in range(args.qformer_depth))
            self.out_norm = nn.LayerNorm(dim, eps=args.norm_eps)
        for p in (self.tok_embed.weight, self.pos_embed) + ((self.queries,) if self.fusion is Fusion.QFORMER else ()):
            nn.init.normal_(p, std=0.02)

    def forward(self, ids: Tensor) -> Tensor:
        tokens = self.embed_norm(self.tok_embed(ids.clamp(0, self.null_token)) + self.pos_embed)  # (B, N, D)
        if self.fusion is not Fusion.QFORMER:
            return tokens
        x = self.queries.expand(ids.shape[0], -1, -1)  # (B, buffer, D)
        for block in self.blocks:
            x = block(x, tokens)
        return self.out_norm(x)


class MAR(nn.Module):
    """MAR encoder/decoder (official key layout) plus the fusion condition network and the head.

    `forward` is the exported `mar` stage: tokens (B, L, C); kept (B, K) sorted positions of the
    tokens already generated; pred (B, P) positions whose conditions are wanted; labels (B,) with
    `null_class` meaning the unconditional `fake_latent`; fusion features from `cond` (or None)
    -> z (B, P, decoder_dim).
    """

    def __init__(self, args: MARArgs):
        super().__init__()
        self.args = args
        a = args
        cross = a.fusion is Fusion.CROSS_ATTN
        self.class_emb = nn.Embedding(a.class_num, a.encoder_embed_dim)
        self.fake_latent = nn.Parameter(torch.zeros(1, a.encoder_embed_dim))
        self.z_proj = nn.Linear(a.token_dim, a.encoder_embed_dim)
        self.z_proj_ln = nn.LayerNorm(a.encoder_embed_dim, eps=1e-6)
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, a.seq_len + a.buffer_size, a.encoder_embed_dim))
        self.encoder_blocks = nn.ModuleList(
            Block(a.encoder_embed_dim, a.encoder_num_heads, a.mlp_ratio, a.norm_eps, cross, a.encoder_embed_dim)
            for _ in range(a.encoder_depth))
        self.encoder_norm = nn.LayerNorm(a.encoder_embed_dim, eps=a.norm_eps)
        self.decoder_embed = nn.Linear(a.encoder_embed_dim, a.decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, a.decoder_embed_dim))
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, a.seq_len + a.buffer_size, a.decoder_embed_dim))
        self.decoder_blocks = nn.ModuleList(
            Block(a.decoder_embed_dim, a.decoder_num_heads, a.mlp_ratio, a.norm_eps, cross, a.encoder_embed_dim)
            for _ in range(a.decoder_depth))
        self.decoder_norm = nn.LayerNorm(a.decoder_embed_dim, eps=a.norm_eps)
        self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, a.seq_len, a.decoder_embed_dim))
        self.condition = None if a.fusion is Fusion.NONE else DiscreteCondition(a)
        self._init_weights()
        self.diffloss = DiffLoss(a.head)  # keeps its own initialisation, as in MAR

    def _init_weights(self) -> None:
        for p in (self.class_emb.weight, self.fake_latent, self.mask_token, self.encoder_pos_embed_learned,
                  self.decoder_pos_embed_learned, self.diffusion_pos_embed_learned):
            nn.init.normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # -- pieces ---------------------------------------------------------------------------------
    def class_embedding(self, labels: Tensor) -> Tensor:
        """(B,) labels -> (B, D); the null class maps to `fake_latent`."""
        table = torch.cat([self.class_emb.weight, self.fake_latent], dim=0)  # (classes + 1, D)
        return table[labels.clamp(0, self.args.class_num)]

    def forward_encoder(self, tokens: Tensor, kept: Tensor, class_embedding: Tensor,
                        fusion: Tensor | None = None) -> Tensor:
        """-> (B, buffer + K, D): buffer slots first, then the kept tokens in position order."""
        a = self.args
        x = self.z_proj(tokens)  # (B, L, D)
        bsz, _, dim = x.shape
        buffer = class_embedding.unsqueeze(1).expand(bsz, a.buffer_size, dim)  # (B, buffer, D)
        if a.fusion is Fusion.QFORMER:
            buffer = buffer + fusion
        x = torch.cat([buffer, x], dim=1) + self.encoder_pos_embed_learned
        x = self.z_proj_ln(x)
        buf_idx = torch.arange(a.buffer_size, device=x.device).expand(bsz, -1)
        idx = torch.cat([buf_idx, kept + a.buffer_size], dim=1)  # (B, buffer + K)
        x = x.gather(1, idx.unsqueeze(-1).expand(-1, -1, dim))
        context = fusion if a.fusion is Fusion.CROSS_ATTN else None
        for block in self.encoder_blocks:
            x = block(x, context)
        return self.encoder_norm(x)

    def forward_decoder(self, x: Tensor, kept: Tensor, fusion: Tensor | None = None) -> Tensor:
        """-> (B, L, Dd) per-position conditions for the head."""
        a = self.args
        x = self.decoder_embed(x)  # (B, buffer + K, Dd)
        bsz, _, dim = x.shape
        buf_idx = torch.arange(a.buffer_size, device=x.device).expand(bsz, -1)
        idx = torch.cat([buf_idx, kept + a.buffer_size], dim=1)
        padded = self.mask_token.to(x.dtype).expand(bsz, a.seq_len + a.buffer_size, dim)
        x = padded.scatter(1, idx.unsqueeze(-1).expand(-1, -1, dim), x) + self.decoder_pos_embed_learned
        context = fusion if a.fusion is Fusion.CROSS_ATTN else None
        for block in self.decoder_blocks:
            x = block(x, context)
        x = self.decoder_norm(x)[:, a.buffer_size:]
        return x + self.diffusion_pos_embed_learned

    def forward(self, tokens: Tensor, kept: Tensor, pred: Tensor, labels: Tensor,
                fusion: Tensor | None = None) -> Tensor:
        z = self.forward_decoder(self.forward_encoder(tokens, kept, self.class_embedding(labels), fusion),
                                 kept, fusion)  # (B, L, Dd)
        return z.gather(1, pred.unsqueeze(-1).expand(-1, -1, z.shape[-1]))  # (B, P, Dd)


def patchify(latents: Tensor, patch_size: int) -> Tensor:
    """(B, c, H, W) VAE latents -> (B, L, c*p*p) tokens, in MAR's channel order."""
    b, c, h, w = latents.shape
    p = patch_size
    x = latents.reshape(b, c, h // p, p, w // p, p)
    return torch.einsum("nchpwq->nhwcpq", x).reshape(b, (h // p) * (w // p), c * p * p)


def unpatchify(tokens: Tensor, patch_size: int, channels: int) -> Tensor:
    """(B, L, c*p*p) tokens of a square grid -> (B, c, H, W) latents."""
    b, seq_len, _ = tokens.shape
    p, h = patch_size, int(round(seq_len ** 0.5))
    x = tokens.reshape(b, h, h, channels, p, p)
    return torch.einsum("nhwcpq->nchpwq", x).reshape(b, channels, h * p, h * p)
