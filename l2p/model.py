"""The Z-Image DiT in both of its forms: the latent source model and the L2P pixel model.

One set of blocks serves both. The latent form embeds 2×2×16 VAE-latent patches and ends in a final
layer; the pixel form embeds 16×16×3 RGB patches (the same token grid: stride 8 × patch 2 = 16) and
ends in the Detailer Head, a small U-Net over the whole noisy image that receives the DiT's last-layer
image tokens at its H/16 bottleneck. State-dict keys are exactly those of the released files.

Conventions (see shared/reference/z_image_facts.md): the DiT is fed t = 1 − σ and its raw output is
≈ x0 − ε, so the velocity is −output. Sequence per item: [image tokens ; caption tokens], each padded to
a multiple of 32 (`DiTConfig.seq_multiple`) with learned pad tokens that are attended to; only padding
*between batch items* is masked (the release forgets to; see tests/test_model.py).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence
from torch.utils.checkpoint import checkpoint

from .config import EDM_SIGMA_DATA, X_PRED_SIGMA_MIN, DetailerConfig, DiTConfig, get_config


# ----------------------------------------------------------------------------------------------
#                                Embedding layers for time and text
# ----------------------------------------------------------------------------------------------

class TimestepEmbedder(nn.Module):
    """Sinusoidal [cos | sin] features of t·t_scale, then an MLP (256 → 1024 → min(dim, 256))."""

    def __init__(self, out_size: int, mid_size: int = 1024, freq_size: int = 256):
        super().__init__()
        self.freq_size = freq_size
        self.mlp = nn.Sequential(nn.Linear(freq_size, mid_size), nn.SiLU(), nn.Linear(mid_size, out_size))

    @staticmethod
    def sinusoid(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        """[cos | sin] embedding in float32, cos first as in every Z-Image implementation."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        # Cast to the weights' dtype (the release hard-codes bf16, which breaks fp32 runs).
        return self.mlp(self.sinusoid(t, self.freq_size).to(self.mlp[0].weight.dtype))


class RMSNorm(nn.Module):
    """RMSNorm with the statistics in float32 (matches diffusers' RMSNorm bit for bit in fp32)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = x.float().pow(2).mean(-1, keepdim=True)
        y = x * torch.rsqrt(var + self.eps)
        return y.to(self.weight.dtype) * self.weight


# ----------------------------------------------------------------------------------------------
#                                          RoPE
# ----------------------------------------------------------------------------------------------

def rope_freqs(pos: torch.Tensor, axes_dims: Sequence[int], theta: float) -> torch.Tensor:
    """Complex rotations for integer positions (..., 3): per axis polar(1, pos·θ^(−2i/d)), axes concatenated."""
    out = []
    for axis, d in enumerate(axes_dims):
        inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float64, device=pos.device) / d))
        ang = (pos[..., axis, None].to(torch.float64) * inv).float()
        out.append(torch.polar(torch.ones_like(ang), ang))
    return torch.cat(out, dim=-1)  # (..., head_dim / 2), complex64


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate (B, S, H, D) by (B, S, D/2) complex freqs; pairs are adjacent (2i, 2i+1), not halves."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * freqs.unsqueeze(2)).flatten(3).type_as(x)


# ----------------------------------------------------------------------------------------------
#                                     Transformer blocks
# ----------------------------------------------------------------------------------------------

class Attention(nn.Module):
    """Bias-free multi-head self-attention with per-head RMS q/k norm and 3-axis RoPE."""

    def __init__(self, dim: int, n_heads: int, qk_norm: bool = True):
        super().__init__()
        self.n_heads = n_heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim, bias=False)])  # key `to_out.0`, as released
        self.norm_q = RMSNorm(dim // n_heads, 1e-5) if qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim // n_heads, 1e-5) if qk_norm else nn.Identity()

    def forward(self, x: torch.Tensor, freqs: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        q, k, v = (f(x).unflatten(-1, (self.n_heads, -1)) for f in (self.to_q, self.to_k, self.to_v))
        q, k = apply_rope(self.norm_q(q), freqs), apply_rope(self.norm_k(k), freqs)
        attn_mask = None if mask is None else mask[:, None, None, :]  # key mask: True = attend
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask)
        return self.to_out[0](o.transpose(1, 2).flatten(2))


class FeedForward(nn.Module):
    """SwiGLU MLP: w2(silu(w1 x) · w3 x)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """Sandwich-norm block; with modulation, adaLN gives (scale_msa, gate_msa, scale_mlp, gate_mlp)."""

    def __init__(self, cfg: DiTConfig, modulation: bool = True):
        super().__init__()
        dim = cfg.dim
        self.attention = Attention(dim, cfg.n_heads, cfg.qk_norm)
        self.feed_forward = FeedForward(dim, cfg.ffn_dim)
        self.attention_norm1 = RMSNorm(dim, cfg.norm_eps)
        self.ffn_norm1 = RMSNorm(dim, cfg.norm_eps)
        self.attention_norm2 = RMSNorm(dim, cfg.norm_eps)
        self.ffn_norm2 = RMSNorm(dim, cfg.norm_eps)
        self.modulation = modulation
        if modulation:
            self.adaLN_modulation = nn.Sequential(nn.Linear(cfg.adaln_dim, 4 * dim))

    def forward(self, x, freqs, mask, temb=None):
        if not self.modulation:  # the context refiner: plain residuals
            x = x + self.attention_norm2(self.attention(self.attention_norm1(x), freqs, mask))
            return x + self.ffn_norm2(self.feed_forward(self.ffn_norm1(x)))
        scale_msa, gate_msa, scale_mlp, gate_mlp = self.adaLN_modulation(temb).unsqueeze(1).chunk(4, dim=2)
        h = self.attention(self.attention_norm1(x) * (1 + scale_msa), freqs, mask)
        x = x + gate_msa.tanh() * self.attention_norm2(h)
        h = self.feed_forward(self.ffn_norm1(x) * (1 + scale_mlp))
        return x + gate_mlp.tanh() * self.ffn_norm2(h)


class FinalLayer(nn.Module):
    """Latent output head: LayerNorm (no affine) scaled by 1 + adaLN(t), then Linear to patch values."""

    def __init__(self, dim: int, adaln_dim: int, out_dim: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(adaln_dim, dim))

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm_final(x) * (1 + self.adaLN_modulation(temb).unsqueeze(1)))


# ----------------------------------------------------------------------------------------------
#                                  Detailer Head (local_decoder)
# ----------------------------------------------------------------------------------------------

FILM_PREFIX = "film_"  # DetailerHead's optional time-conditioning layers; new ones start at zero (convert too)


def nearest_upsample_weight(channels: int) -> torch.Tensor:
    """The 2×2 stride-2 ConvTranspose2d weight (in, out, 2, 2) that computes nearest ×2 upsampling."""
    return torch.eye(channels)[:, :, None, None].expand(channels, channels, 2, 2).clone()


class DetailerHead(nn.Module):
    """U-Net over the full-resolution noisy image; DiT tokens join at the bottleneck (H / 2^depth).

    Keys follow the release's `MicroDiffusionModel`: enc{k}.0, bottleneck.0, up{k}.1, dec{k}.0, out_conv.
    Time reaches the head only through the DiT features, unless `time_conditioning` adds FiLM layers
    (film_enc{k}, film_dec{k}; not in the release). `upsample="learned"` puts a transposed conv at up{k}.0
    where the release has a parameter-free nearest upsample. A feature map of another size (e.g. from a
    64-1 embedder for 4K) is resized to the bottleneck grid with nearest interpolation.
    """

    # On CPU, oneDNN's convs run ~2× faster channels-last (bench/bench_head_layout.py); only fp32 rounding
    # changes. Not measured on GPU, so left off there.
    cpu_channels_last: bool = True

    def __init__(self, cfg: DetailerConfig, dim: int, in_channels: int = 3, temb_dim: int = 256):
        super().__init__()
        ch, d = cfg.channels, cfg.depth
        self.depth = d
        self.time_conditioning = cfg.time_conditioning
        for k in range(1, d + 1):
            c_in = in_channels if k == 1 else ch[k - 2]
            setattr(self, f"enc{k}", nn.Sequential(nn.Conv2d(c_in, ch[k - 1], 3, padding=1), nn.SiLU()))
        self.pool = nn.MaxPool2d(2, stride=2)
        self.bottleneck = nn.Sequential(nn.Conv2d(ch[-1] + dim, ch[-1], 1), nn.SiLU())
        c_up = ch[-1]
        self.upsample = cfg.upsample
        for k in range(d, 0, -1):
            up = (nn.ConvTranspose2d(c_up, c_up, 2, stride=2) if cfg.upsample == "learned"
                  else nn.Upsample(scale_factor=2, mode="nearest"))
            setattr(self, f"up{k}", nn.Sequential(up, nn.Conv2d(c_up, c_up, 3, padding=1)))
            c_out = ch[k - 2] if k >= 2 else ch[0]
            setattr(self, f"dec{k}", nn.Sequential(nn.Conv2d(c_up + ch[k - 1], c_out, 3, padding=1), nn.SiLU()))
            c_up = c_out
        self.out_conv = nn.Conv2d(c_up, cfg.out_channels, 1)
        if cfg.time_conditioning:
            for name in self.film_names():
                width = getattr(self, name)[0].out_channels
                setattr(self, FILM_PREFIX + name, nn.Linear(temb_dim, 2 * width))
            self.zero_film()
        self.nearest_upsample_init()

    def film_names(self) -> list[str]:
        """The conv blocks a FiLM follows: enc1…encD, decD…dec1."""
        return [f"enc{k}" for k in range(1, self.depth + 1)] + [f"dec{k}" for k in range(self.depth, 0, -1)]

    def zero_film(self) -> None:
        """FiLM layers output 0 (scale 1, shift 0): the head then computes exactly what the release's does."""
        for name in self.film_names() if self.time_conditioning else ():
            nn.init.zeros_(getattr(self, FILM_PREFIX + name).weight)
            nn.init.zeros_(getattr(self, FILM_PREFIX + name).bias)

    def nearest_upsample_init(self) -> None:
        """Learned upsamplers start as nearest ×2 (so the head starts as the release's); no-op otherwise."""
        for k in range(1, self.depth + 1) if self.upsample == "learned" else ():
            conv = getattr(self, f"up{k}")[0]
            with torch.no_grad():
                conv.weight.copy_(nearest_upsample_weight(conv.in_channels))
                conv.bias.zero_()

    def _block(self, name: str, h: torch.Tensor, temb: Optional[torch.Tensor]) -> torch.Tensor:
        h = getattr(self, name)(h)
        if not self.time_conditioning:
            return h
        scale, shift = getattr(self, FILM_PREFIX + name)(temb).to(h.dtype)[:, :, None, None].chunk(2, dim=1)
        return h * (1 + scale) + shift

    def forward(self, x: torch.Tensor, features: torch.Tensor, temb: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.time_conditioning and temb is None:
            raise ValueError("this Detailer Head is time-conditioned: pass the DiT's timestep embedding (temb)")
        if x.device.type == "cpu" and self.cpu_channels_last:
            x, features = (t.contiguous(memory_format=torch.channels_last) for t in (x, features))
        skips, h = [], x
        for k in range(1, self.depth + 1):
            h = self._block(f"enc{k}", h, temb)
            skips.append(h)
            h = self.pool(h)
        if features.shape[-2:] != h.shape[-2:]:
            features = F.interpolate(features, size=h.shape[-2:], mode="nearest")
        h = self.bottleneck(torch.cat([h, features.to(h.dtype)], dim=1))
        for k in range(self.depth, 0, -1):
            h = self._block(f"dec{k}", torch.cat([getattr(self, f"up{k}")(h), skips[k - 1]], dim=1), temb)
        return self.out_conv(h).contiguous()


# ----------------------------------------------------------------------------------------------
#                                      Patchify helpers
# ----------------------------------------------------------------------------------------------

def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(C, H, W) → (H/p · W/p, p·p·C) tokens, row-major, each ordered (ph, pw, c) with channel fastest."""
    c, h, w = x.shape
    return x.reshape(c, h // p, p, w // p, p).permute(1, 3, 2, 4, 0).reshape((h // p) * (w // p), p * p * c)


def unpatchify(tokens: torch.Tensor, p: int, c: int, h: int, w: int) -> torch.Tensor:
    """Exact inverse of `patchify`."""
    return tokens.reshape(h // p, w // p, p, p, c).permute(4, 0, 2, 1, 3).reshape(c, h, w)


def _ceil_to(n: int, m: int) -> int:
    return -(-n // m) * m


def _grid_ids(axis0: int, ht: int, wt: int, device) -> torch.Tensor:
    """RoPE ids (axis0, h, w) for a ht×wt token grid, row-major."""
    hh, ww = torch.meshgrid(torch.arange(ht, device=device), torch.arange(wt, device=device), indexing="ij")
    return torch.stack([torch.full_like(hh, axis0), hh, ww], dim=-1).reshape(-1, 3)


def _pad_batch(seqs: list[torch.Tensor]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Right-pad per-item sequences into a batch; the key mask is None when no item needed padding."""
    lens = [s.shape[0] for s in seqs]
    out = pad_sequence(seqs, batch_first=True)
    if len(set(lens)) == 1:
        return out, None
    mask = torch.arange(out.shape[1], device=out.device)[None] < torch.tensor(lens, device=out.device)[:, None]
    return out, mask


# ----------------------------------------------------------------------------------------------
#                                       The DiT
# ----------------------------------------------------------------------------------------------

ImageBatch = Union[torch.Tensor, Sequence[torch.Tensor]]


class ZImageDiT(nn.Module):
    """Z-Image single-stream DiT; latent form with `all_final_layer`, pixel (L2P) form with `local_decoder`."""

    def __init__(self, cfg: Union[DiTConfig, str]):
        super().__init__()
        cfg = get_config(cfg)
        self.cfg = cfg
        self.gradient_checkpointing = False
        self.all_x_embedder = nn.ModuleDict({
            f"{p}-{f}": nn.Linear(f * p * p * cfg.in_channels, cfg.dim)
            for p, f in zip(cfg.all_patch_size, cfg.all_f_patch_size)})
        if not cfg.is_pixel:
            self.all_final_layer = nn.ModuleDict({
                f"{p}-{f}": FinalLayer(cfg.dim, cfg.adaln_dim, f * p * p * cfg.in_channels)
                for p, f in zip(cfg.all_patch_size, cfg.all_f_patch_size)})
        self.noise_refiner = nn.ModuleList([TransformerBlock(cfg, True) for _ in range(cfg.n_refiner_layers)])
        self.context_refiner = nn.ModuleList([TransformerBlock(cfg, False) for _ in range(cfg.n_refiner_layers)])
        self.t_embedder = TimestepEmbedder(cfg.adaln_dim)
        self.cap_embedder = nn.Sequential(RMSNorm(cfg.cap_feat_dim, cfg.norm_eps), nn.Linear(cfg.cap_feat_dim, cfg.dim))
        self.x_pad_token = nn.Parameter(torch.zeros(1, cfg.dim))
        self.cap_pad_token = nn.Parameter(torch.zeros(1, cfg.dim))
        self.layers = nn.ModuleList([TransformerBlock(cfg, True) for _ in range(cfg.n_layers)])
        if cfg.is_pixel:
            self.local_decoder = DetailerHead(cfg.detailer, cfg.dim, cfg.in_channels, cfg.adaln_dim)

    # -- initialisation ------------------------------------------------------------------------

    def init_for_training_from_scratch(self, generator: Optional[torch.Generator] = None) -> "ZImageDiT":
        """DiT-style init for models trained from scratch: xavier Linears, zero adaLN and outputs.

        Zeroed adaLN makes every gate tanh(0) = 0, so each block starts as the identity; converted
        models never call this (their trunk is copied).
        """
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight, generator=generator)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for blk in list(self.noise_refiner) + list(self.layers):
            nn.init.zeros_(blk.adaLN_modulation[0].weight)
            nn.init.zeros_(blk.adaLN_modulation[0].bias)
        for fl in getattr(self, "all_final_layer", {}).values():
            for lin in (fl.linear, fl.adaLN_modulation[1]):
                nn.init.zeros_(lin.weight)
                nn.init.zeros_(lin.bias)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02, generator=generator)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02, generator=generator)
        if self.cfg.is_pixel:
            nn.init.zeros_(self.local_decoder.out_conv.weight)
            nn.init.zeros_(self.local_decoder.out_conv.bias)
            self.local_decoder.zero_film()
        return self

    # -- sequence construction -----------------------------------------------------------------

    def _caption_list(self, cap_feats, cap_mask) -> list[torch.Tensor]:
        """Per-item (L_i, D) caption features from a list, or from a padded (B, L, D) tensor + mask."""
        if isinstance(cap_feats, torch.Tensor):
            if cap_mask is None:
                return list(cap_feats)
            return [f[m.bool()] for f, m in zip(cap_feats, cap_mask)]
        return list(cap_feats)

    def _embed_captions(self, caps: list[torch.Tensor]):
        """Captions → (B, Lp, dim) tokens, RoPE ids, validity mask and per-item padded lengths.

        Item i keeps its L_i tokens, then cap_pad_token up to a multiple of cfg.seq_multiple (32 as released;
        attended to, as released), then batch padding up to the longest item (masked out).
        """
        lens = torch.tensor([c.shape[0] for c in caps])
        m = self.cfg.seq_multiple
        lens_pad = torch.clamp((lens + m - 1) // m * m, min=m)
        width = int(lens_pad.max())
        feats = pad_sequence(caps, batch_first=True)
        feats = F.pad(feats, (0, 0, 0, width - feats.shape[1]))
        tok = self.cap_embedder(feats)
        j = torch.arange(width, device=tok.device)[None]
        is_pad = (j >= lens.to(tok.device)[:, None]).unsqueeze(-1)
        tok = torch.where(is_pad, self.cap_pad_token.to(tok.dtype), tok)
        ids = torch.zeros(len(caps), width, 3, dtype=torch.long, device=tok.device)
        ids[..., 0] = j + 1
        valid = j < lens_pad.to(tok.device)[:, None]
        return tok, ids, valid, lens_pad.tolist()

    def _embed_images(self, x: torch.Tensor, p: int, cap_lens_pad: list[int]):
        """Equal-sized images (B, C, H, W) → (B, Np, dim) tokens padded with x_pad_token, and RoPE ids."""
        b, c, h, w = x.shape
        if h % p or w % p:
            raise ValueError(f"image of size {h}×{w} is not divisible by the patch size {p}")
        ht, wt = h // p, w // p
        tok = x.reshape(b, c, ht, p, wt, p).permute(0, 2, 4, 3, 5, 1).reshape(b, ht * wt, p * p * c)
        tok = self.all_x_embedder[f"{p}-1"](tok)
        n, n_pad = ht * wt, _ceil_to(ht * wt, self.cfg.seq_multiple)
        tok = torch.cat([tok, self.x_pad_token.to(tok.dtype).expand(b, n_pad - n, -1)], dim=1)
        ids = torch.zeros(b, n_pad, 3, dtype=torch.long, device=x.device)
        ids[:, :n] = _grid_ids(0, ht, wt, x.device)
        ids[:, :n, 0] = torch.tensor(cap_lens_pad, device=x.device)[:, None] + 1
        return tok, ids, n, (ht, wt)

    def _run(self, blocks, x, freqs, mask, temb=None):
        for blk in blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(blk, x, freqs, mask, temb, use_reentrant=False)
            else:
                x = blk(x, freqs, mask, temb)
        return x

    # -- forward -------------------------------------------------------------------------------

    def forward(self, x: ImageBatch, t: torch.Tensor, cap_feats, cap_mask: Optional[torch.Tensor] = None,
                patch_size: Optional[int] = None, return_features: bool = False):
        """Raw DiT output (≈ x0 − ε; velocity = −output) for images x at DiT time t = 1 − σ.

        x: (B, C, H, W) or a list of (C, H, W) of any sizes divisible by the patch. t: (B,) or scalar.
        cap_feats: list of (L_i, D), or (B, L, D) with a boolean cap_mask. Output matches x's form.
        With return_features, also returns {"features": [(dim, H/p, W/p)], "grids": [(H/p, W/p)]}.
        """
        cfg = self.cfg
        p = patch_size or cfg.default_patch
        if f"{p}-1" not in self.all_x_embedder:
            raise KeyError(f"no patch embedder for patch {p}; this model has {list(self.all_x_embedder)}")
        dtype = self.x_pad_token.dtype
        stacked = isinstance(x, torch.Tensor)
        xs = [xi.squeeze(1) if xi.ndim == 4 else xi for xi in x]  # accept (C, 1, H, W) like diffusers
        caps = [c.to(dtype) for c in self._caption_list(cap_feats, cap_mask)]
        if len(caps) != len(xs):
            raise ValueError(f"{len(xs)} images but {len(caps)} captions")
        t = torch.as_tensor(t, device=xs[0].device, dtype=torch.float32).reshape(-1).expand(len(xs))
        temb = self.t_embedder(t * cfg.t_scale)
        rope = lambda ids: rope_freqs(ids, cfg.axes_dims, cfg.rope_theta)

        cap_tok, cap_ids, cap_valid, cap_lens_pad = self._embed_captions(caps)
        if len(set(cap_lens_pad)) == 1:
            cap_valid = None  # no padding between items: let SDPA take its unmasked path
        if stacked:  # one size: everything batched
            xb = torch.stack(xs).to(dtype)
            img_tok, img_ids, n, grid = self._embed_images(xb, p, cap_lens_pad)
            n_real, grids, img_valid = [n] * len(xs), [grid] * len(xs), None
        else:  # mixed sizes: embed one by one, pad between items
            per = [self._embed_images(xi[None].to(dtype), p, [lp]) for xi, lp in zip(xs, cap_lens_pad)]
            img_tok, img_valid = _pad_batch([q[0][0] for q in per])
            img_ids, _ = _pad_batch([q[1][0] for q in per])
            n_real, grids = [q[2] for q in per], [q[3] for q in per]

        # Refiners see one modality each; masks only cover padding between batch items.
        img_tok = self._run(self.noise_refiner, img_tok, rope(img_ids), img_valid, temb)
        cap_tok = self._run(self.context_refiner, cap_tok, rope(cap_ids), cap_valid)

        # Unified sequence per item: [image tokens ; caption tokens], batch padding at the end.
        if stacked:
            h, ids = torch.cat([img_tok, cap_tok], 1), torch.cat([img_ids, cap_ids], 1)
            mask = None if cap_valid is None else torch.cat([torch.ones_like(img_ids[..., 0], dtype=torch.bool),
                                                             cap_valid], 1)
        else:
            lens = [_ceil_to(n, self.cfg.seq_multiple) for n in n_real]
            h, mask = _pad_batch([torch.cat([img_tok[i, :l], cap_tok[i, :lc]])
                                  for i, (l, lc) in enumerate(zip(lens, cap_lens_pad))])
            ids, _ = _pad_batch([torch.cat([img_ids[i, :l], cap_ids[i, :lc]])
                                 for i, (l, lc) in enumerate(zip(lens, cap_lens_pad))])
        h = self._run(self.layers, h, rope(ids), mask, temb)

        # Only the real image tokens leave the trunk (the release also reshaped the pad tokens).
        if stacked:
            ht, wt = grids[0]
            maps = h[:, : n_real[0]].transpose(1, 2).reshape(len(xs), cfg.dim, ht, wt)
            if cfg.is_pixel:
                out = self._head_output(self.local_decoder(xb, maps, temb), xb, t)
            else:
                tok = self.all_final_layer[f"{p}-1"](h[:, : n_real[0]], temb)
                out = tok.reshape(len(xs), ht, wt, p, p, -1).permute(0, 5, 1, 3, 2, 4).reshape(xb.shape)
            feats = list(maps)
        else:
            feats = [h[i, : n_real[i]].T.reshape(cfg.dim, *grids[i]) for i in range(len(xs))]
            if cfg.is_pixel:
                out = []
                for i, (xi, f) in enumerate(zip(xs, feats)):
                    xi = xi[None].to(dtype)
                    out.append(self._head_output(self.local_decoder(xi, f[None], temb[i : i + 1]), xi,
                                                 t[i : i + 1])[0])
            else:
                fl = self.all_final_layer[f"{p}-1"]
                out = [unpatchify(fl(h[i : i + 1, : n_real[i]], temb[i : i + 1])[0], p, cfg.in_channels,
                                  *xs[i].shape[-2:]) for i in range(len(xs))]
        if return_features:
            return out, {"features": feats, "grids": list(grids)}
        return out

    def _head_output(self, out: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The head's output in the release's x0 − ε form, whatever the head predicts."""
        pred = self.cfg.detailer.prediction
        if pred == "velocity":
            return out
        if pred == "x":  # x0 − ε = −v = (x̂0 − x_σ)/σ with σ = 1 − t; in fp32, as σ can be small.
            sigma = (1 - t.float()).clamp_min(X_PRED_SIGMA_MIN).reshape(-1, 1, 1, 1)
            return ((out.float() - x.float()) / sigma).to(out.dtype)
        # "edm": with D = Var(x_σ) = (1−σ)²s² + σ², c_skip = (1−σ)s²/D and c_out = sσ/√D. In the x0 − ε form
        # (x̂0 − x_σ)/σ the σ cancels exactly: ((1−σ)s² − σ)/D · x_σ + s/√D · output. No clamp is needed.
        sigma, s2 = (1 - t.float()).reshape(-1, 1, 1, 1), EDM_SIGMA_DATA ** 2
        d = (1 - sigma) ** 2 * s2 + sigma ** 2
        return (((1 - sigma) * s2 - sigma) / d * x.float() + EDM_SIGMA_DATA / d.sqrt() * out.float()).to(out.dtype)

    # -- loading -------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path, config: Union[DiTConfig, str, None] = None, dtype: torch.dtype = torch.float32,
                        device: Union[str, torch.device] = "cpu", strict: bool = True) -> "ZImageDiT":
        """Load a checkpoint (one file, shards, an index json or a folder) without a second copy in memory.

        The model is built on the meta device and each tensor is read, cast to `dtype` and assigned
        one at a time, so peak memory stays near the loaded model's size. The config comes from
        `config`, a `config.json` beside the files, or the checkpoint's key shapes.
        """
        from .checkpoint import CheckpointReader, resolve_checkpoint_files
        from .loading import config_for_checkpoint, load_into

        files = resolve_checkpoint_files(path)
        with CheckpointReader(files) as reader:
            cfg = get_config(config) if config is not None else config_for_checkpoint(files, reader)
            with torch.device("meta"):
                model = cls(cfg)
            load_into(model, reader, dtype=dtype, device=device, strict=strict)
        return model.eval()

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
