"""Metrics: one JSON line per step (metrics.jsonl), one printed log line, and a PNG of the curves."""
from __future__ import annotations

import json
import math
import os


class MetricsLogger:
    def __init__(self, out_dir: str, name: str = "metrics", resume_step: int | None = None):
        try:
            os.makedirs(out_dir, exist_ok=True)
        except OSError as e:  # a file of that name, no permission
            raise OSError(f"out_dir {out_dir!r} cannot be created: {e}") from e
        self.path = os.path.join(out_dir, f"{name}.jsonl")
        if resume_step is not None and os.path.exists(self.path):
            # Drop lines past the checkpoint: the resumed run writes those steps again. A torn last
            # line (a crash mid-write) is dropped too; a bad line elsewhere is an error naming it.
            rows = []
            with open(self.path) as f:
                lines = [(i, x) for i, x in enumerate(f, 1) if x.strip()]
            for j, (i, x) in enumerate(lines):
                try:
                    rows.append(json.loads(x))
                except json.JSONDecodeError as e:
                    if j == len(lines) - 1:
                        print(f"warning: {self.path}:{i}: a torn last line (an interrupted write), dropped")
                        continue
                    raise ValueError(f"{self.path}:{i}: not a JSON line ({e})") from e
            rows = [r for r in rows if r.get("step", 0) <= resume_step]
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
            os.replace(tmp, self.path)
        elif resume_step is None and os.path.exists(self.path):
            os.remove(self.path)

    def log(self, row: dict, keys: tuple = ()) -> str:
        # a non-finite number (accuracy without an accuracy reward: NaN) as null: JSON has no NaN, and
        # json.dumps would write the bare NaN that strict JSON readers reject
        clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(clean, allow_nan=False) + "\n")
        return " ".join(f"{k} {_fmt(row[k])}" for k in (keys or row) if k in row)

    def rows(self) -> list[dict]:
        with open(self.path) as f:
            return [json.loads(line) for line in f if line.strip()]


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    return str(v)


def plot_metrics(jsonl: str, png: str, keys: list[str] | None = None) -> str | None:
    """Curves of the numeric columns of a metrics.jsonl against step; None if nothing to plot."""
    if not os.path.isfile(jsonl):
        return None
    with open(jsonl) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if not rows:
        return None
    keys = keys or [k for k in rows[-1] if k != "step" and isinstance(rows[-1][k], (int, float))]
    if not keys:
        return None
    import matplotlib
    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    cols = min(3, len(keys))
    nrows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 2.6 * nrows), squeeze=False)
    for ax, k in zip(axes.flat, keys):
        pts = [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float))]
        if pts:
            ax.plot(*zip(*pts), lw=1)
        ax.set_title(k, fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)
    return png
