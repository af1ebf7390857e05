"""Fixed-size KV blocks: a free list, reference counts, and prefix sharing by fork.

The G samples of a GRPO group share their prompt: the leader's prompt is prefilled once and each
follower's block table starts as a copy of the leader's (reference counts go up). A block is written
only by a sequence that owns it alone, so the first decode step of a sample whose next slot falls in
a shared block (the prompt's partial last block) copies that block first: copy on write. Full
shared blocks are only ever read, so they stay shared for the whole rollout.

Across groups, the prompts of one generate() call often start with the same tokens (a system
prompt, a chat template, few-shot examples). The engine prefills the full blocks of that common
prefix once, as a root sequence that holds them for the whole call; allocate(seq, prefix=root) then
shares the root's blocks and takes fresh ones only for the rest (seq.num_cached_tokens = the
prefix's tokens, so the prefill computes only what follows). A sequence recomputed after preemption
shares them again.
"""
from __future__ import annotations

from collections import deque

from reasonrl.engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"BlockManager: num_blocks and block_size must be >= 1, got {num_blocks}, {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.ref_counts = [0] * num_blocks
        self.free_ids: deque[int] = deque(range(num_blocks))
        self.peak_used = 0

    @property
    def num_free(self) -> int:
        return len(self.free_ids)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free_ids)

    def _take(self) -> int:
        block = self.free_ids.popleft()
        self.ref_counts[block] = 1
        self.peak_used = max(self.peak_used, self.num_used)
        return block

    def _release(self, block: int):
        self.ref_counts[block] -= 1
        assert self.ref_counts[block] >= 0, f"block {block} released more often than taken"
        if self.ref_counts[block] == 0:
            self.free_ids.append(block)

    # -- prefill ---------------------------------------------------------------------------
    def prefix_blocks(self, seq: Sequence, prefix: Sequence | None) -> int:
        """How many blocks of `prefix` (a cached root of whole blocks) seq can share: all of them when
        seq's tokens start with the prefix's and go past it (its prefill needs one new token), else 0."""
        if prefix is None or len(seq) <= len(prefix) or seq.token_ids[:len(prefix)] != prefix.token_ids:
            return 0
        return len(prefix.block_table)

    def can_allocate(self, seq: Sequence, extra: int = 0, prefix: Sequence | None = None) -> bool:
        return self.num_free >= seq.num_blocks(self.block_size) - self.prefix_blocks(seq, prefix) + extra

    def allocate(self, seq: Sequence, prefix: Sequence | None = None):
        """Blocks for every token of seq: the blocks of a cached prefix it starts with, shared (its
        prefill then computes only the tokens after them: seq.num_cached_tokens), and fresh ones."""
        assert not seq.block_table, f"{seq} already holds blocks"
        shared = prefix.block_table[:self.prefix_blocks(seq, prefix)] if prefix is not None else []
        for block in shared:
            self.ref_counts[block] += 1
        seq.block_table = shared + [self._take() for _ in range(seq.num_blocks(self.block_size) - len(shared))]
        seq.num_cached_tokens = len(shared) * self.block_size

    def fork(self, parent: Sequence, child: Sequence):
        """child shares all of parent's blocks (read-only until copy on write)."""
        assert not child.block_table, f"{child} already holds blocks"
        for block in parent.block_table:
            self.ref_counts[block] += 1
        child.block_table = list(parent.block_table)

    def free(self, seq: Sequence):
        for block in reversed(seq.block_table):
            self._release(block)
        seq.block_table = []

    def trim(self, seq: Sequence):
        """Give back blocks past the sequence's length (after thinking control drops tokens)."""
        keep = seq.num_blocks(self.block_size)
        for block in seq.block_table[keep:]:
            self._release(block)
        del seq.block_table[keep:]

    # -- decode ----------------------------------------------------------------------------
    def _append_need(self, seq: Sequence) -> int:
        """Blocks a decode step needs: the slot of position len-1 must be in a block seq owns alone."""
        idx = (len(seq) - 1) // self.block_size
        if idx >= len(seq.block_table):
            return 1
        return 1 if self.ref_counts[seq.block_table[idx]] > 1 else 0

    def can_append(self, seq: Sequence) -> bool:
        return self.num_free >= self._append_need(seq)

    def append_slot(self, seq: Sequence) -> tuple[int, int] | None:
        """Make the slot of position len-1 writable; returns (src, dst) when a block must be copied."""
        idx = (len(seq) - 1) // self.block_size
        if idx >= len(seq.block_table):
            assert idx == len(seq.block_table), f"{seq}: block table is behind its length"
            seq.block_table.append(self._take())
            return None
        old = seq.block_table[idx]
        if self.ref_counts[old] == 1:
            return None
        new = self._take()
        self._release(old)
        seq.block_table[idx] = new
        return old, new

    def blocks_to_reserve(self, seq: Sequence, num_tokens: int) -> int:
        return max(0, (num_tokens + self.block_size - 1) // self.block_size - len(seq.block_table))

    def reserve(self, seq: Sequence, num_tokens: int):
        """Own blocks for the first num_tokens positions (a decode window writes several slots ahead).
        Only blocks past the table are added: the block of position len-1 is made writable by
        append_slot first, and every later position falls in it or in a fresh block."""
        for _ in range(self.blocks_to_reserve(seq, num_tokens)):
            seq.block_table.append(self._take())

    def slot(self, seq: Sequence, pos: int) -> int:
        return seq.block_table[pos // self.block_size] * self.block_size + pos % self.block_size

    # -- invariants (tests) ------------------------------------------------------------------
    def check(self, live: list[Sequence]):
        """Reference counts equal the references held by live sequences; free list = unreferenced."""
        counts = [0] * self.num_blocks
        for seq in live:
            assert len(set(seq.block_table)) == len(seq.block_table), f"{seq}: a block appears twice"
            for block in seq.block_table:
                counts[block] += 1
        assert counts == self.ref_counts, "reference counts differ from the live block tables"
        free = set(self.free_ids)
        assert len(free) == len(self.free_ids), "a block is on the free list twice"
        assert free == {b for b in range(self.num_blocks) if counts[b] == 0}, "free list != unreferenced blocks"
