"""PNG plots of an evaluation, one curve per model (the comparison mode), matplotlib Agg backend."""
from __future__ import annotations

import os


def _plt():
    import matplotlib
    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt
    return plt


def _colors(ax, n: int) -> None:
    """n distinct colours: matplotlib's cycle repeats after 10 (a run of 11 checkpoints drew its first
    and last in the same blue), so more curves follow a colormap, in order (a run's steps)."""
    if n > 10:
        import numpy as np
        ax.set_prop_cycle(color=_plt().cm.viridis(np.linspace(0, 0.95, n)))


def _save(fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _plt().close(fig)
    return path


def plot_passk(res: dict, path: str) -> str | None:
    labels = [lab for lab in res if "passk" in res[lab]]
    if not labels:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, kind in zip(axes, ("pass", "maj")):
        _colors(ax, len(labels))
        for lab in labels:
            p = res[lab]["passk"]
            ks = sorted(int(k.split("@")[1]) for k in p if k.startswith(kind + "@"))
            ax.plot(ks, [100 * p[f"{kind}@{k}"] for k in ks], marker="o", label=lab)
        ax.set(xlabel="k", ylabel=f"{kind}@k (%)", title=f"{kind}@k")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return _save(fig, path)


def plot_budget(res: dict, path: str) -> str | None:
    """Accuracy against measured mean thinking tokens: capped points, the natural one, extensions."""
    labels = [lab for lab in res if res[lab].get("budget")]
    if not labels:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    _colors(ax, len(labels))
    for lab in labels:
        pts = sorted(res[lab]["budget"], key=lambda p: p["mean_thinking_tokens"])
        line, = ax.plot([p["mean_thinking_tokens"] for p in pts], [100 * p["accuracy"] for p in pts],
                        marker="o", ms=4, label=lab)
        for p in res[lab]["budget"]:
            if p["setting"] == "natural" or p["think_extend"]:
                ax.plot(p["mean_thinking_tokens"], 100 * p["accuracy"], "*" if p["setting"] == "natural" else "s",
                        color=line.get_color(), ms=10 if p["setting"] == "natural" else 6)
    ax.set(xlabel="mean thinking tokens per completion (measured)", ylabel="accuracy (%)",
           title="accuracy against thinking budget (* natural, squares: 'Wait' extensions)")
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_difficulty(res: dict, path: str) -> str | None:
    labels = [lab for lab in res if res[lab].get("difficulty")]
    if not labels:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for ax, key, name in zip(axes, ("accuracy", "mean_length", "mean_thinking_tokens"),
                             ("accuracy (%)", "mean response length (tokens)", "mean thinking tokens")):
        _colors(ax, len(labels))
        for lab in labels:
            pts = res[lab]["difficulty"]
            scale = 100 if key == "accuracy" else 1
            ax.plot([p["difficulty"] for p in pts], [scale * p[key] for p in pts], marker="o", label=lab)
        ax.set(xlabel="difficulty", ylabel=name, title=name)
        ax.set_xticks([p["difficulty"] for p in res[labels[0]]["difficulty"]])
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return _save(fig, path)


def plot_markers(res: dict, path: str) -> str | None:
    """Marker frequency per 1k tokens across models (in the given order: checkpoints of a run)."""
    labels = [lab for lab in res if "markers" in res[lab]]
    if not labels:
        return None
    plt = _plt()
    names = list(res[labels[0]]["markers"]["markers"])
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(labels) + 2), 3.6))
    x = range(len(labels))
    _colors(ax, len(names))
    for m in names:
        ax.plot(list(x), [res[lab]["markers"]["markers"][m]["per_1k_tokens"] for lab in labels], marker="o", label=m)
    ax.set_xticks(list(x), labels, rotation=20 if len(labels) > 3 else 0, fontsize=8)
    ax.set(ylabel="occurrences per 1k tokens", title="self-verification / backtracking markers")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


PLOTS = ("passk", "budget", "difficulty", "markers")


def plot_all(results: dict, out_dir: str) -> list[str]:
    res = results["results"]
    fns = {"passk": plot_passk, "budget": plot_budget, "difficulty": plot_difficulty, "markers": plot_markers}
    made = [fns[name](res, os.path.join(out_dir, f"{name}.png")) for name in PLOTS]
    return [p for p in made if p]
