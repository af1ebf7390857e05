"""Rotary position embeddings (RoPE) and the scaling variants Llama/Qwen configs use.

For head dim D and base theta, pair i (0 <= i < D/2) rotates by angle p * f_i at position p,
f_i = theta^(-2i/D) (Su et al. 2021, "RoFormer"). We rotate the two halves of each head
(x1 = x[:D/2], x2 = x[D/2:]), the Hugging Face layout of Llama/Qwen checkpoints:
    out = [x1 cos - x2 sin, x2 cos + x1 sin]
Scaling variants only change f_i (and for yarn, multiply cos/sin by an attention factor):
    linear : f_i / factor                                  (position interpolation)
    llama3 : low frequencies / factor, high kept, a smooth ramp between (Llama 3.1)
    yarn   : per-pair blend of f_i and f_i / factor by a ramp over rotation counts, and
             cos/sin scaled by 0.1 ln(factor) + 1 (Peng et al. 2023, "YaRN")
    dynamic: NTK-aware scaling that grows with the sequence: when a sequence's length in this
             forward, L = its last position + 1, exceeds max_position_embeddings M, theta becomes
             theta * (factor L / M - (factor - 1))^(D / (D - 2)) for its tokens; at L <= M, plain RoPE.
             Per sequence, so a sequence's result does not depend on what else is in the batch (a
             seeded request samples the same tokens alone or batched). transformers takes L from the
             whole batch's longest position (and keeps the largest seen until a forward within M);
             the two agree on one sequence, fresh and through generation, where L only grows.
Angles and rotations are computed in float32 whatever the compute dtype, as transformers does.
"""
from __future__ import annotations

import math

import torch


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> tuple[torch.Tensor, float]:
    """-> (inv_freq (D/2,) float32, attention_factor)"""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))  # (D/2,)
    if not scaling:
        return inv, 1.0
    kind = scaling["rope_type"]
    if kind == "linear":
        return inv / scaling["factor"], 1.0
    if kind == "llama3":
        return _llama3(inv, scaling), 1.0
    if kind == "yarn":
        return _yarn(head_dim, theta, scaling)
    raise ValueError(f"rope_inv_freq: rope type {kind!r} is not supported")


def _llama3(inv: torch.Tensor, s: dict) -> torch.Tensor:
    factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old_len / lo, inv / factor, inv)  # long wavelengths: interpolate
    smooth = (old_len / wavelen - lo) / (hi - lo)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
    return torch.where(medium, blended, scaled)


def _yarn(dim: int, theta: float, s: dict) -> tuple[torch.Tensor, float]:
    factor = s["factor"]
    old_len = s["original_max_position_embeddings"]
    attn = s.get("attention_factor")
    if attn is None:
        ms, ms_all = s.get("mscale"), s.get("mscale_all_dim")
        attn = _mscale(factor, ms) / _mscale(factor, ms_all) if ms and ms_all else _mscale(factor)
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def corr_dim(rot):  # the pair index that completes `rot` rotations over old_len positions
        return dim * math.log(old_len / (rot * 2 * math.pi)) / (2 * math.log(theta))

    low, high = corr_dim(beta_fast), corr_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos = theta ** (torch.arange(0, dim, 2).float() / dim)
    extrapolate = 1 - ramp  # 1: keep f_i (fast-rotating pairs), 0: f_i / factor
    inv = (1.0 / (factor * pos)) * (1 - extrapolate) + (1.0 / pos) * extrapolate
    return inv, float(attn)


def _mscale(scale, m=1.0):
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0


def dynamic_ntk_inv_freq(head_dim: int, theta: float, factor: float, max_pos: int, seq_len: int) -> torch.Tensor:
    base = theta * ((factor * seq_len / max_pos) - (factor - 1)) ** (head_dim / (head_dim - 2))
    return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


class RotaryEmbedding(torch.nn.Module):
    def __init__(self, head_dim: int, theta: float, scaling: dict | None, max_position_embeddings: int = 2048):
        super().__init__()
        self.head_dim, self.theta, self.scaling = head_dim, theta, scaling
        self.dynamic = bool(scaling) and scaling["rope_type"] == "dynamic"
        self.max_pos = max_position_embeddings
        inv, self.attention_factor = rope_inv_freq(head_dim, theta, None if self.dynamic else scaling)
        self.register_buffer("inv_freq", inv, persistent=False)

    def reset(self):
        """Recompute inv_freq (after the module was built on the meta device and moved with to_empty)."""
        inv, _ = rope_inv_freq(self.head_dim, self.theta, None if self.dynamic else self.scaling)
        self.inv_freq = inv.to(self.inv_freq.device)

    def forward(self, positions: torch.Tensor, cu_seqlens: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (T,) int64 -> cos, sin (T, 1, D/2) float32. cu_seqlens (B+1,): the sequences of the
        packed tokens, for dynamic NTK (without it, each token is the last of its own sequence, as in
        a decode step)."""
        inv = self.inv_freq[None, :]
        if self.dynamic and positions.numel():
            inv = self._dynamic_inv(positions, cu_seqlens)
        ang = positions.float()[:, None] * inv  # (T, D/2)
        return (ang.cos() * self.attention_factor)[:, None], (ang.sin() * self.attention_factor)[:, None]

    def _dynamic_inv(self, positions: torch.Tensor, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
        """(1 or T, D/2): each token's sequence length L decides its frequencies (module docstring)."""
        if cu_seqlens is None:
            lens = positions + 1
        else:
            cu = cu_seqlens.to(device=positions.device, dtype=torch.int64)
            last = positions[(cu[1:] - 1).clamp(min=0)]  # empty sequences repeat 0 times below
            lens = torch.repeat_interleave(last + 1, cu[1:] - cu[:-1], output_size=positions.numel())
        lens = torch.where(lens > self.max_pos, lens, 0)  # 0: plain RoPE
        # a host sync (dynamic models run without CUDA graphs); one row per distinct length, each as
        # dynamic_ntk_inv_freq computes it (transformers' arithmetic)
        uniq, idx = torch.unique(lens, return_inverse=True)
        values = uniq.tolist()
        if values == [0]:
            return self.inv_freq[None, :]
        rows = [self.inv_freq if L == 0 else dynamic_ntk_inv_freq(
            self.head_dim, self.theta, self.scaling["factor"], self.max_pos, L).to(self.inv_freq.device) for L in values]
        return torch.stack(rows)[idx]
