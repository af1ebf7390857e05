"""Per-step attention metadata: one small object instead of arguments threaded through every forward."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttnContext:
    """How the packed tokens of one forward are grouped and where their keys/values live.

    Training / plain forward: kv_caches None; tokens packed; causal attention inside each
    sequence of cu_seqlens. Prefill with a cache: the same, and every new token's k/v is written
    through slot_mapping (if context_lens says a sequence is longer than its new tokens, the earlier
    ones are read from the cache). Decode: is_prefill False, one new token per sequence.
    """

    cu_seqlens: torch.Tensor  # (B+1,) int32, offsets of the sequences in the packed tokens
    max_seqlen: int
    is_prefill: bool = True
    slot_mapping: torch.Tensor | None = None  # (total,) int64, block_id * block_size + offset; -1 skips
    block_tables: torch.Tensor | None = None  # (B, max_blocks) int32
    context_lens: torch.Tensor | None = None  # (B,) int32, tokens in the cache after this step
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per layer (num_blocks, block_size, Hkv, D)
    # Shared prefixes in training (no cache): prefix_of[b] is the sequence whose tokens all of
    # sequence b's queries also attend to (its prompt, packed once for a GRPO group), or -1.
    # b's positions continue the prefix's; a prefix has no prefix of its own. See attention.py.
    prefix_of: list[int] | None = None

    @classmethod
    def from_lengths(cls, lengths, device="cpu", **kw) -> "AttnContext":
        """A context for packed sequences of the given lengths (list of ints)."""
        lengths = [int(n) for n in lengths]
        if not lengths or min(lengths) <= 0:
            raise ValueError(f"AttnContext.from_lengths: lengths must be a non-empty list of positive ints, got {lengths}")
        cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
        cu[1:] = torch.tensor(lengths).cumsum(0)
        return cls(cu_seqlens=cu.to(device), max_seqlen=max(lengths), **kw)
