"""Mix Transformer (MiT-B0 ... B5), the SegFormer encoder (Xie et al., NeurIPS 2021).

Four stages, each: an overlapping patch embedding (strided conv + LayerNorm; 7x7/4 then 3x3/2),
transformer blocks of efficient self-attention (keys/values spatially reduced by a strided conv of
ratio 8/4/2/1) and Mix-FFN (fc, 3x3 depth-wise conv, GELU, fc), then a LayerNorm. The output is the
four stage maps at strides 4, 8, 16, 32, channels-first.

Module names follow the released ImageNet checkpoints (``patch_embed1.proj``, ``block1.0.attn.q``,
``block1.0.attn.kv``, ``block1.0.attn.sr``, ``block1.0.mlp.dwconv.dwconv``, ``norm1`` ...), so
loading maps keys without renaming (see pretrained.py). Tokens are kept as [B, N, C]; with a
channels_last input the token/map reshapes are views, not copies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class MiTSpec:
    embed_dims: tuple[int, int, int, int]
    depths: tuple[int, int, int, int]
    num_heads: tuple[int, int, int, int] = (1, 2, 5, 8)
    mlp_ratios: tuple[int, int, int, int] = (4, 4, 4, 4)
    sr_ratios: tuple[int, int, int, int] = (8, 4, 2, 1)


# SegFormer paper, Table 6 (appendix): channels, depths; heads, MLP ratios and reduction ratios are
# shared by all sizes.
_WIDE = (64, 128, 320, 512)
MIT_SPECS: dict[str, MiTSpec] = {
    "mit_b0": MiTSpec((32, 64, 160, 256), (2, 2, 2, 2)),
    "mit_b1": MiTSpec(_WIDE, (2, 2, 2, 2)),
    "mit_b2": MiTSpec(_WIDE, (3, 4, 6, 3)),
    "mit_b3": MiTSpec(_WIDE, (3, 4, 18, 3)),
    "mit_b4": MiTSpec(_WIDE, (3, 8, 27, 3)),
    "mit_b5": MiTSpec(_WIDE, (3, 6, 40, 3)),
}


def drop_path(x: Tensor, p: float, training: bool) -> Tensor:
    """Stochastic depth: zero whole samples of a residual branch with probability ``p``."""
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
    return x * mask.div_(keep)


class DropPath(nn.Module):
    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return drop_path(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def tokens_to_map(x: Tensor, h: int, w: int) -> Tensor:
    """[B, N, C] tokens -> [B, C, H, W] (a channels_last-strided view when ``x`` is contiguous)."""
    return x.transpose(1, 2).unflatten(2, (h, w))


def map_to_tokens(x: Tensor) -> Tensor:
    """[B, C, H, W] -> [B, N, C] (a view for channels_last input)."""
    return x.flatten(2).transpose(1, 2)


class OverlapPatchEmbed(nn.Module):
    """Strided conv whose kernel overlaps neighbouring patches, then LayerNorm over channels."""

    def __init__(self, in_channels: int, dim: int, patch_size: int, stride: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, patch_size, stride, padding=patch_size // 2)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> tuple[Tensor, int, int]:
        x = self.proj(x)
        h, w = x.shape[-2:]
        return self.norm(map_to_tokens(x)), h, w


class EfficientSelfAttention(nn.Module):
    """Multi-head attention whose keys/values come from a ``sr_ratio``-times smaller map."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, sr_ratio, sr_ratio)
            self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        b, n, c = x.shape
        heads = self.num_heads
        q = self.q(x).view(b, n, heads, c // heads).transpose(1, 2)
        if self.sr_ratio > 1:
            x = self.norm(map_to_tokens(self.sr(tokens_to_map(x, h, w))))
        k, v = self.kv(x).view(b, -1, 2, heads, c // heads).permute(2, 0, 3, 1, 4).unbind(0)
        # scale defaults to head_dim ** -0.5, as in the paper
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class DWConv(nn.Module):
    """3x3 depth-wise conv on tokens: the positional information of Mix-FFN."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        return map_to_tokens(self.dwconv(tokens_to_map(x, h, w)))


class MixFFN(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = DWConv(hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        return self.fc2(self.act(self.dwconv(self.fc1(x), h, w)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: int, sr_ratio: int,
                 drop_path_p: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = EfficientSelfAttention(dim, num_heads, sr_ratio)
        self.drop_path = DropPath(drop_path_p)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MixFFN(dim, dim * mlp_ratio)

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), h, w))
        return x + self.drop_path(self.mlp(self.norm2(x), h, w))


class MixTransformer(nn.Module):
    """MiT encoder; ``forward`` returns the four stage maps [B, C_i, H/s_i, W/s_i], s = 4..32."""

    def __init__(self, name: str = "mit_b5", drop_path_rate: float = 0.1) -> None:
        super().__init__()
        if name not in MIT_SPECS:
            raise ValueError(f"unknown MiT size {name!r}; expected one of {sorted(MIT_SPECS)}")
        spec = MIT_SPECS[name]
        self.name = name
        self.out_channels = list(spec.embed_dims)
        self.depths = spec.depths
        # drop-path grows linearly with block index over the whole network
        total = sum(spec.depths)
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        in_channels = 3
        first = 0
        for i in range(4):
            dim = spec.embed_dims[i]
            patch, stride = (7, 4) if i == 0 else (3, 2)
            setattr(self, f"patch_embed{i + 1}", OverlapPatchEmbed(in_channels, dim, patch, stride))
            blocks = [Block(dim, spec.num_heads[i], spec.mlp_ratios[i], spec.sr_ratios[i],
                            rates[first + j]) for j in range(spec.depths[i])]
            setattr(self, f"block{i + 1}", nn.ModuleList(blocks))
            setattr(self, f"norm{i + 1}", nn.LayerNorm(dim, eps=1e-6))
            in_channels = dim
            first += spec.depths[i]
        self.apply(_init_mit)

    def forward(self, x: Tensor) -> list[Tensor]:
        outs = []
        for i in range(1, 5):
            tokens, h, w = getattr(self, f"patch_embed{i}")(x)
            for block in getattr(self, f"block{i}"):
                tokens = block(tokens, h, w)
            tokens = getattr(self, f"norm{i}")(tokens)
            x = tokens_to_map(tokens, h, w)
            outs.append(x)
        return outs


def _init_mit(m: nn.Module) -> None:
    """SegFormer's initialisation: truncated normal linears, fan-out normal convs."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            nn.init.zeros_(m.bias)


__all__ = ["MIT_SPECS", "MiTSpec", "MixTransformer", "DropPath", "drop_path"]
