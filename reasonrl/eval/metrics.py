"""Test-time-compute metrics: pass@k, maj@k, thinking-token counts, reasoning-marker frequencies.

pass@k (Chen et al. 2021, "Evaluating Large Language Models Trained on Code", eq. 1): from n
samples of which c are correct, the probability that at least one of k samples drawn without
replacement is correct,

    pass@k = 1 - C(n - c, k) / C(n, k) = 1 - prod_{i = n-c+1}^{n} (1 - k / i)

The product form never builds the binomials: as floats they overflow (C(1100, 550) > 1e308), as
integers they are exact but grow to hundreds of digits for no gain.

maj@k (self-consistency, Wang et al. 2022): the answer given by most of k samples, answers compared
with the rewards module's normalization and verified equivalence ("0.5" == "1/2"). Two samples
vote together only if they were also scored alike: where correctness is more than the answer's
value (countdown: "4" and "(25+3)-24" are equal numbers, only the second uses the given numbers),
a class holding both would be scored by whichever came first. Ties go to
the class whose first member came first; samples without an extractable answer do not vote. Over
n samples, maj@k is the mean over the n // k disjoint runs of k consecutive samples (lower
variance than one run, and deterministic).
"""
from __future__ import annotations

import re
from collections.abc import Callable

from reasonrl.rl.rewards import answers_equal


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (product form of 1 - C(n-c, k) / C(n, k))."""
    if n < 1:
        raise ValueError(f"pass_at_k: n must be >= 1, got {n}")
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: c must be in [0, n={n}], got {c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: k must be in [1, n={n}] (n samples per problem), got {k}")
    if n - c < k:  # every draw of k contains a correct sample
        return 1.0
    prob_all_wrong = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_wrong *= 1.0 - k / i
    return 1.0 - prob_all_wrong


def majority(answers: list[str | None], equal: Callable[[str, str], bool] = answers_equal,
             keys: list | None = None) -> int | None:
    """Index of the first member of the largest class of equivalent answers; None if none voted.

    Classes are built in sample order, each answer joining the first class whose representative it
    equals (and whose key it shares, when keys are given), so the result depends only on the list
    (ties: the class seen first wins)."""
    classes: list[list[int]] = []  # sample indices; classes[j][0] is the representative
    for i, a in enumerate(answers):
        if a is None:
            continue
        for members in classes:
            if (keys is None or keys[i] == keys[members[0]]) and equal(a, answers[members[0]]):
                members.append(i)
                break
        else:
            classes.append([i])
    if not classes:
        return None
    best = max(classes, key=len)  # max keeps the first of equal lengths
    return best[0]


def maj_at_k(answers: list[str | None], correct: list[bool], k: int,
             equal: Callable[[str, str], bool] = answers_equal) -> float:
    """Mean majority-vote accuracy over the n // k disjoint runs of k consecutive samples."""
    n = len(answers)
    if len(correct) != n:
        raise ValueError(f"maj_at_k: {n} answers but {len(correct)} correctness flags")
    if not 1 <= k <= n:
        raise ValueError(f"maj_at_k: k must be in [1, n={n}] (n samples per problem), got {k}")
    runs = n // k
    hits = 0
    for r in range(runs):
        i = majority(answers[r * k:(r + 1) * k], equal, keys=correct[r * k:(r + 1) * k])
        hits += bool(i is not None and correct[r * k + i])
    return hits / runs


def think_spans(ids: list[int], start: list[int], end: list[int], inside: bool = False) -> list[int]:
    """Token counts of each <think>...</think> span in `ids` (its opening and closing tags not counted;
    a nested "<think>" inside a span is content, as the engine's think_budget counts it).

    inside: the prompt already opened the span (engine.llm_engine.opens_think). An unclosed span counts up
    to the end of the completion. Tags are token-id sequences, so multi-token tags work."""
    spans, i, n = [], 0, len(ids)
    if inside:
        spans.append(0)
    while i < n:
        if not inside and ids[i:i + len(start)] == start:
            inside, i = True, i + len(start)
            spans.append(0)
        elif inside and ids[i:i + len(end)] == end:
            inside, i = False, i + len(end)
        else:
            if inside:
                spans[-1] += 1
            i += 1
    return spans


DEFAULT_MARKERS = ("wait", "check", "verify", "let me recompute", "actually", "hmm")


def marker_pattern(marker: str) -> re.Pattern:
    """Case-insensitive, at a word start: "Wait," and "checking" count, "await" does not."""
    return re.compile(r"(?<![a-z])" + re.escape(marker.lower()), re.IGNORECASE)


def marker_counts(texts: list[str], markers: list[str], num_tokens: int) -> dict:
    """Per marker: total count, per response, per 1k completion tokens, share of responses with it."""
    out = {}
    n = max(1, len(texts))
    for m in markers:
        pat = marker_pattern(m)
        counts = [len(pat.findall(t or "")) for t in texts]
        out[m] = {"count": sum(counts), "per_response": sum(counts) / n,
                  "per_1k_tokens": 1000 * sum(counts) / max(1, num_tokens),
                  "response_rate": sum(c > 0 for c in counts) / n}
    return out
