"""Continuous batching: every step is either one prefill batch or one decode batch.

Prefill first (new work keeps the decode batch full), as in vLLM's V0 scheduler. A GRPO group
enters as its leader plus followers: the leader's tokens are prefilled once and the followers fork
its blocks in the same step, so the whole group joins the running batch together.
When a decode step finds no free block, the most recently admitted sequence is preempted: its
blocks are freed and it goes back to the front of the waiting queue, to be recomputed (prefilled
again with the tokens it has so far). Nothing is dropped or truncated; a sequence that could not
run even alone with the whole cache is refused up front by the engine (check_fits).
`prefix`: the engine's cached common prefix of the call's prompts (BlockManager.prefix_blocks), or
None; a prefill admits a sequence for the tokens after it.
"""
from __future__ import annotations

from collections import deque

from reasonrl.engine.block_manager import BlockManager
from reasonrl.engine.sequence import Sequence, Status


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.bm = block_manager
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()
        self.num_preemptions = 0
        self.prefix: Sequence | None = None

    def check_fits(self, seq: Sequence, max_len: int):
        need = (max_len + self.bm.block_size - 1) // self.bm.block_size
        if need > self.bm.num_blocks:
            raise ValueError(
                f"a sequence of up to {max_len} tokens (prompt {seq.num_prompt_tokens} + max_tokens "
                f"{seq.params.max_tokens}) needs {need} KV blocks but the cache has {self.bm.num_blocks} "
                f"(block_size {self.bm.block_size}); raise kv_cache_bytes or lower max_tokens")

    def add(self, leader: Sequence):
        """leader.followers (possibly empty) join with it and share its prefill."""
        self.waiting.append(leader)

    @property
    def is_finished(self) -> bool:
        return not self.waiting and not self.running

    def schedule(self) -> tuple[list[Sequence], bool, list[tuple[int, int]]]:
        """(sequences of this step, is_prefill, block copies to do before the step)."""
        scheduled = self._schedule_prefill()
        if scheduled:
            return scheduled, True, []
        return self._schedule_decode()

    def _schedule_prefill(self) -> list[Sequence]:
        scheduled, tokens = [], 0
        while self.waiting:
            seq = self.waiting[0]
            group = 1 + len(seq.followers)
            if len(self.running) + len(scheduled) + group > self.max_num_seqs and (self.running or scheduled):
                break
            new = len(seq) - self.bm.prefix_blocks(seq, self.prefix) * self.bm.block_size
            if scheduled and tokens + new > self.max_num_batched_tokens:
                break
            # room for the prompt plus one block per sample to grow into, unless the cache is idle
            extra = group if (self.running or scheduled) else 0
            if not self.bm.can_allocate(seq, extra, self.prefix):
                break
            self.waiting.popleft()
            self.bm.allocate(seq, self.prefix)
            seq.status = Status.RUNNING
            scheduled.append(seq)
            tokens += new
            for f in seq.followers:
                self.bm.fork(seq, f)
                f.leader, f.status = seq, Status.RUNNING
                scheduled.append(f)
            seq.followers = []
        self.running.extend(scheduled)
        return scheduled

    def _schedule_decode(self) -> tuple[list[Sequence], bool, list[tuple[int, int]]]:
        scheduled, copies = [], []
        while self.running:
            seq = self.running.popleft()
            while not self.bm.can_append(seq):
                if self.running:
                    self._preempt(self.running.pop())
                else:
                    self._preempt(seq)
                    break
            else:
                copy = self.bm.append_slot(seq)
                if copy is not None:
                    copies.append(copy)
                scheduled.append(seq)
        self.running.extend(scheduled)
        return scheduled, False, copies

    def reserve_steps(self, seqs: list[Sequence], steps: int) -> int:
        """After a decode schedule(): blocks for `steps` decode steps of every sequence (positions
        len-1 .. len+steps-2), as many steps as the free blocks allow (at least the 1 already made
        writable). Never preempts: a window that does not fit just gets shorter."""
        need = lambda k: sum(self.bm.blocks_to_reserve(s, len(s) + k - 1) for s in seqs)  # noqa: E731
        while steps > 1 and need(steps) > self.bm.num_free:
            steps -= 1
        for s in seqs:
            self.bm.reserve(s, len(s) + steps - 1)
        return steps

    def _preempt(self, seq: Sequence):
        self.bm.free(seq)
        seq.status, seq.num_cached_tokens = Status.WAITING, 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence):
        seq.status = Status.FINISHED
        self.bm.free(seq)
        self.running.remove(seq)
