"""One request sample: its tokens, its blocks in the KV cache, and its sampling state."""
from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass

import torch


@dataclass
class SamplingParams:
    """How to sample one request. temperature 0 is greedy.

    seed: a request with a seed samples the same tokens whatever else is in the batch; sample i of
    the n samples of a prompt draws from a generator seeded by (seed, i).
    think_budget: at most this many tokens inside <think>...</think>; then "</think>" is forced.
    think_extend: up to this many times, an end of thinking the model emits is replaced by
    think_extend_text (s1-style budget forcing), and thinking goes on.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    max_tokens: int = 256
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    ignore_eos: bool = False
    think_budget: int | None = None
    think_extend: int = 0
    think_extend_text: str = "Wait"

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"SamplingParams: temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams: top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"SamplingParams: top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"SamplingParams: min_p must be in [0, 1], got {self.min_p}")
        if self.max_tokens < 1:
            raise ValueError(f"SamplingParams: max_tokens must be >= 1, got {self.max_tokens}")
        if self.think_budget is not None and self.think_budget < 0:
            raise ValueError(f"SamplingParams: think_budget must be >= 0 or None, got {self.think_budget}")
        if self.think_extend < 0:
            raise ValueError(f"SamplingParams: think_extend must be >= 0, got {self.think_extend}")
        self.stop_token_ids = tuple(int(t) for t in self.stop_token_ids)
        self.stop_strings = tuple(self.stop_strings)


@dataclass
class Completion:
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" | "length"
    length: int
    text: str | None = None


class Status(enum.Enum):
    WAITING = 0
    RUNNING = 1
    FINISHED = 2


def sample_seed(seed: int | None, index: int) -> int:
    """The generator seed of sample `index` of a request: fixed by (seed, index), or fresh."""
    if seed is None:
        return int(torch.randint(0, 2**62, (1,)).item())
    return (int(seed) * 1_000_003 + index * 7_919 + 12_345) % 2**62


_NO_DRAWS = torch.empty(0)


@dataclass
class ThinkState:
    """Where a sequence is in its <think>...</think> span (only tracked when the tags are known)."""

    inside: bool = False
    tokens: int = 0  # tokens generated inside the current thinking span
    extensions: int = 0  # times an end of thinking was replaced by the continuation text
    closing: bool = False  # a forced "</think>" is being emitted


class Sequence:
    _ids = itertools.count()

    def __init__(self, prompt: list[int], params: SamplingParams, sample_index: int = 0, request_index: int = 0):
        self.seq_id = next(Sequence._ids)
        self.request_index, self.sample_index = request_index, sample_index
        self.token_ids: list[int] = list(prompt)
        self.num_prompt_tokens = len(prompt)
        self.params = params
        self.status = Status.WAITING
        self.block_table: list[int] = []
        self.num_cached_tokens = 0  # tokens whose k/v are in the cache
        self.logprobs: list[float] = []
        self.finish_reason: str | None = None
        self.generator = torch.Generator().manual_seed(sample_seed(params.seed, sample_index))
        self.spare_uniforms = _NO_DRAWS  # draws taken from the generator but not used yet
        self.forced: list[int] = []  # tokens to emit next instead of sampling (thinking control)
        self.think = ThinkState()
        self.followers: list[Sequence] = []  # group samples that share this prompt's prefill
        self.leader: Sequence | None = None  # set on a follower while its leader prefills for it
        self.num_preemptions = 0

    def __len__(self):
        return len(self.token_ids)

    @property
    def completion_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_completion_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == Status.FINISHED

    def num_blocks(self, block_size: int) -> int:
        """Blocks that hold all of this sequence's tokens."""
        return (len(self) + block_size - 1) // block_size

    def append(self, token: int, logprob: float):
        self.token_ids.append(int(token))
        self.logprobs.append(float(logprob))

    def uniforms(self, k: int) -> torch.Tensor:
        """The next k draws of this sequence's random stream, (k,) float32 on the CPU: the same numbers
        as k calls of torch.rand((), generator=self.generator), so a decode window of k steps draws them
        at once."""
        have = self.spare_uniforms
        if have.numel() >= k:
            self.spare_uniforms = have[k:]
            return have[:k]
        self.spare_uniforms = _NO_DRAWS
        return torch.cat([have, torch.rand(k - have.numel(), generator=self.generator)])

    def unread_uniforms(self, u: torch.Tensor):
        """Give back draws taken but not used (a decode window cut short): they come next, in order."""
        self.spare_uniforms = torch.cat([u, self.spare_uniforms])

    def truncate(self, length: int):
        """Drop generated tokens past `length` (never into the prompt); their k/v get rewritten."""
        assert self.num_prompt_tokens <= length <= len(self)
        del self.token_ids[length:]
        del self.logprobs[length - self.num_prompt_tokens:]
        self.num_cached_tokens = min(self.num_cached_tokens, length - 1)

    def __repr__(self):
        return f"Sequence(id={self.seq_id}, len={len(self)}, status={self.status.name}, blocks={self.block_table})"
