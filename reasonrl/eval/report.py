"""The printed summary of an evaluation: one markdown table per section, models as rows."""
from __future__ import annotations


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _table(header: list[str], rows: list[list[str]]) -> str:
    cell = lambda x: str(x).replace("|", "\\|")  # noqa: E731 (a label or marker with "|" split its row)
    lines = ["| " + " | ".join(map(cell, header)) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(cell, r)) + " |" for r in rows])


def summary_table(results: dict) -> str:
    res = results["results"]
    labels = list(res)
    cfg = results["config"]
    diff = "the task's default" if cfg["difficulty"] is None else cfg["difficulty"]
    head = f"task {cfg['task']} (difficulty {diff}), {cfg['num_problems']} held-out problems"
    parts = [f"{head}, seed {cfg['seed']}"]
    with_passk = [lab for lab in labels if "passk" in res[lab]]
    if with_passk:
        keys = [k for k in res[with_passk[0]]["passk"] if k.startswith(("pass@", "maj@"))]
        p0 = res[with_passk[0]]["passk"]
        parts.append(f"\npass@k / maj@k: n={p0['n']} samples per problem at temperature {p0['temperature']}")
        parts.append(_table(["model", *keys, "mean length", "thinking tokens"],
                            [[lab, *(_pct(res[lab]["passk"][k]) for k in keys), f"{res[lab]['passk']['mean_length']:.1f}",
                              f"{res[lab]['passk']['mean_thinking_tokens']:.1f}"] for lab in with_passk]))
    with_budget = [lab for lab in labels if "budget" in res[lab]]
    if with_budget:
        names = [p["setting"] for p in res[with_budget[0]]["budget"]]
        parts.append("\naccuracy (mean thinking tokens) against thinking budget / extensions")
        parts.append(_table(["model", *names], [[lab, *(f"{_pct(p['accuracy'])} ({p['mean_thinking_tokens']:.1f})"
                                                      for p in res[lab]["budget"])] for lab in with_budget]))
    with_diff = [lab for lab in labels if "difficulty" in res[lab]]
    if with_diff and res[with_diff[0]]["difficulty"]:
        levels = [p["difficulty"] for p in res[with_diff[0]]["difficulty"]]
        parts.append("\naccuracy / mean response length (tokens) by difficulty")
        parts.append(_table(["model", *(f"d={d}" for d in levels)],
                            [[lab, *(f"{_pct(p['accuracy'])} / {p['mean_length']:.1f}" for p in res[lab]["difficulty"])]
                             for lab in with_diff]))
    with_markers = [lab for lab in labels if "markers" in res[lab]]
    if with_markers:
        names = list(res[with_markers[0]]["markers"]["markers"])
        parts.append("\nreasoning markers per 1k tokens (share of responses with the marker)")
        parts.append(_table(["model", *names],
                            [[lab, *(f"{m['per_1k_tokens']:.2f} ({_pct(m['response_rate'])})"
                                     for m in res[lab]["markers"]["markers"].values())] for lab in with_markers]))
    return "\n".join(parts)
