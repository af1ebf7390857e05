"""One request sample: its tokens, its blocks in the KV cache, and its sampling state."""
from __future__ import annotations

import enum
import itertools
import math
import numbers
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from reasonrl.ops.logprobs import MIN_TEMPERATURE


@dataclass
class SamplingParams:
    """How to sample one request. temperature 0 is greedy; otherwise at least MIN_TEMPERATURE (1e-5).

    seed: a request with a seed samples the same tokens whatever else is in the batch; sample i of
    the n samples of a prompt draws from a generator seeded by (seed, i).
    think_budget: at most this many tokens inside <think>...</think>; then "</think>" is forced.
    think_extend: up to this many times, an end of thinking the model emits is replaced by
    think_extend_text (s1-style budget forcing), and thinking goes on.
    stop_strings: a list of strings, or one str as ONE stop string ("ab" stops at "ab", not at "a" or
    "b"); empty strings are rejected. stop_token_ids: a list of ids, or one int.
    Types are checked (TypeError): counts are ints (not bool, not 2.5, not "4"); temperature, top_p
    and min_p are finite real numbers.
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
        self.temperature = _real("temperature", self.temperature)
        if not (self.temperature == 0 or self.temperature >= MIN_TEMPERATURE):
            raise ValueError(f"SamplingParams: temperature must be 0 (greedy) or >= {MIN_TEMPERATURE} (logits / "
                             f"temperature overflows float32 below), got {self.temperature}")
        self.top_p = _real("top_p", self.top_p)
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams: top_p must be in (0, 1], got {self.top_p}")
        self.top_k = _int("top_k", self.top_k)
        if not 0 <= self.top_k < 2 ** 62:
            raise ValueError(f"SamplingParams: top_k must be >= 0 (0 = off) and below 2**62, got {self.top_k}")
        self.min_p = _real("min_p", self.min_p)
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"SamplingParams: min_p must be in [0, 1], got {self.min_p}")
        self.max_tokens = _int("max_tokens", self.max_tokens)
        if self.max_tokens < 1:
            raise ValueError(f"SamplingParams: max_tokens must be >= 1, got {self.max_tokens}")
        if self.seed is not None:
            self.seed = _int("seed", self.seed)
        if self.think_budget is not None:
            self.think_budget = _int("think_budget", self.think_budget)
            if self.think_budget < 0:
                raise ValueError(f"SamplingParams: think_budget must be >= 0 or None, got {self.think_budget}")
        self.think_extend = _int("think_extend", self.think_extend)
        if self.think_extend < 0:
            raise ValueError(f"SamplingParams: think_extend must be >= 0, got {self.think_extend}")
        if not isinstance(self.think_extend_text, str):
            raise TypeError(f"SamplingParams: think_extend_text must be a str, got {type(self.think_extend_text).__name__}")
        if not isinstance(self.ignore_eos, bool):
            raise TypeError(f"SamplingParams: ignore_eos must be a bool, got {self.ignore_eos!r}")
        # One id or one string is accepted as a single stop (a str is NOT split into its characters).
        ids = (self.stop_token_ids,) if is_int(self.stop_token_ids) else self.stop_token_ids
        if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
            raise TypeError(f"SamplingParams: stop_token_ids must be a list of token ids, got {ids!r}")
        self.stop_token_ids = tuple(_int("stop_token_ids[]", t) for t in ids)
        if any(t < 0 for t in self.stop_token_ids):
            raise ValueError(f"SamplingParams: stop_token_ids must be >= 0, got {self.stop_token_ids}")
        strs = (self.stop_strings,) if isinstance(self.stop_strings, str) else self.stop_strings
        if not isinstance(strs, Iterable) or not all(isinstance(x, str) for x in strs):
            raise TypeError(f"SamplingParams: stop_strings must be a str or a list of str, got {self.stop_strings!r}")
        self.stop_strings = tuple(strs)
        if "" in self.stop_strings:
            raise ValueError("SamplingParams: stop_strings must not contain an empty string (it would stop at once)")


def is_int(v) -> bool:
    """An int, numpy int or the like; not a bool, not a float (2.0), not a str."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def prompt_token_ids(p, i: int) -> list[int]:
    """Prompt i of generate() as a list of Python ints: a list/tuple of ints or a 1-D integer tensor or
    numpy array. Floats (1.7 must not become 1), bools and strings raise a TypeError naming the prompt."""
    if isinstance(p, str):
        raise TypeError(f"generate: prompt {i} is a str; prompts are token-id lists (use generate_text for text)")
    if torch.is_tensor(p) or hasattr(p, "dtype"):  # torch tensor or numpy array
        dt = str(p.dtype)
        if p.ndim != 1 or "int" not in dt:  # int8..int64, uint8: ok; float*, bool, complex: not
            raise TypeError(f"generate: prompt {i} must be a 1-D integer tensor/array of token ids, "
                            f"got shape {tuple(p.shape)} {dt}")
        return [int(t) for t in p.tolist()]
    if not isinstance(p, (list, tuple)):
        raise TypeError(f"generate: prompt {i} must be a list of token ids, got {type(p).__name__}")
    if not all(type(t) is int for t in p):  # the fast path; else numpy ints and the like are fine
        for t in p:
            if not is_int(t):
                hint = " (for text, use generate_text)" if isinstance(t, str) else ""
                raise TypeError(f"generate: prompt {i} must hold int token ids, got {t!r} ({type(t).__name__}){hint}")
    return [int(t) for t in p]


def max_context(cfg) -> int | None:
    """The most tokens (prompt + generated) one sequence may have: the model's max_position_embeddings,
    times the factor for dynamic NTK RoPE (a scaling meant to extend the context); None if unknown."""
    m = getattr(cfg, "max_position_embeddings", None)
    if m is None:
        return None
    s = getattr(cfg, "rope_scaling", None) or {}
    return int(m * s["factor"]) if s.get("rope_type") == "dynamic" else m


def _int(name: str, v) -> int:
    """v as an int: bools, floats (2.5, 2.0) and strings ("4") raise a TypeError naming the argument."""
    if not is_int(v):
        raise TypeError(f"SamplingParams: {name} must be an int, got {v!r} ({type(v).__name__})")
    return int(v)


def _real(name: str, v) -> float:
    """v as a finite float: bools, strings, nan and inf raise, naming the argument."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"SamplingParams: {name} must be a real number, got {v!r} ({type(v).__name__})")
    if not math.isfinite(v):
        raise ValueError(f"SamplingParams: {name} must be finite, got {v}")
    return float(v)


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


def common_prefix_len(prompts: list[list[int]]) -> int:
    """Tokens that every prompt starts with, leaving each prompt at least one token of its own."""
    first, n = prompts[0], min(len(p) for p in prompts) - 1
    for p in prompts[1:]:
        n = next((i for i in range(n) if p[i] != first[i]), n)
    return max(n, 0)


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
