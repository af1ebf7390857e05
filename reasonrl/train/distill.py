"""Distillation (`reasonrl distill --teacher DIR`): a teacher's verified-correct traces train a
smaller student by SFT, beside the same student trained without them.

1. The cold-start set: num_examples worked examples of the task, the same set `reasonrl train`'s
   SFT stage sees with the same seed (sft.sft_examples).
2. The teacher answers teacher_prompts other training-split questions, samples_per_prompt samples
   each; sample.run_sample keeps the verified-correct ones (the shortest per prompt by default)
   and writes them to out_dir/teacher_traces.jsonl with provenance.
3. Two students from the same random init ("tiny-s": d=96, 3 layers, 0.37M parameters against the
   default model's 0.86M): "distilled" = SFT on cold start + teacher traces; "baseline" = SFT on the
   cold-start set alone. Same steps, batch, lr and schedule: the only difference is the traces.
4. Greedy held-out accuracy of the teacher and both students (test split, never trained on),
   printed as a table and written to out_dir/distill.json and distill.md.

Measured 2026-11-26 on the shared 2-core CPU machine (1 thread), defaults, seed 0, teacher = a
default run's GRPO model (82.4% held-out), 500 held-out problems (standard error ~2.2 points):
  cold-start set   student + teacher traces        student alone   difference   wall
  500 (default)    83.8% (500 + 1642 traces)       82.4%           +1.4         1094 s (load ~8)
  100              90.2% (100 + 1726 traces)        0.8%           +89.4         548 s
With 500 worked examples and 1500 steps at lr 2e-3 the small student already matches the teacher:
the traces add little. With 100 it memorizes them (loss 3e-7) and fails; the traces carry it past
its teacher (shortest verified-correct traces only: the filter removes the teacher's mistakes).
"""
from __future__ import annotations

import dataclasses
import json
import os
import time

from reasonrl.rl.tasks import get_task, load_jsonl
from reasonrl.train.common import evaluate, load_model_and_tokenizer
from reasonrl.train.config import DistillConfig, SampleConfig, SFTConfig
from reasonrl.train.sample import run_sample
from reasonrl.train.sft import run_sft, sft_examples


def run_distill(cfg: DistillConfig) -> dict:
    t0 = time.perf_counter()
    if not os.path.isdir(cfg.teacher):
        raise ValueError(f"DistillConfig.teacher: no such model folder {cfg.teacher!r} "
                         "(run `reasonrl train` first, or pass --teacher DIR)")
    sft_cfg = SFTConfig(model=cfg.student, task=cfg.task, difficulty=cfg.difficulty, num_examples=cfg.num_examples,
                        steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, warmup_steps=cfg.warmup_steps,
                        min_lr_ratio=cfg.min_lr_ratio, seed=cfg.seed, log_every=max(1, cfg.steps // 10))
    cold = sft_examples(sft_cfg)
    heldout = get_task(cfg.task, cfg.difficulty).problems(cfg.eval_problems, seed=cfg.seed, split="test")
    traces_path = os.path.join(cfg.out_dir, "teacher_traces.jsonl")
    teacher, tok = load_model_and_tokenizer(cfg.teacher)
    sample = run_sample(SampleConfig(model=cfg.teacher, task=cfg.task, difficulty=cfg.difficulty,
                                     num_prompts=cfg.teacher_prompts, n=cfg.samples_per_prompt,
                                     temperature=cfg.temperature, max_tokens=cfg.max_tokens, shortest=cfg.shortest,
                                     seed=cfg.seed, out=traces_path),
                        model=teacher, tokenizer=tok, exclude={p.question for p in cold})
    if sample["kept"] == 0:
        raise ValueError(f"DistillConfig.teacher {cfg.teacher!r}: no verified-correct trace in "
                         f"{sample['samples']} samples; a distillation teacher must solve some problems")
    traces = load_jsonl(traces_path)
    results = {"teacher": {**_score(teacher, tok, heldout, cfg, "teacher", cfg.teacher),
                           "params": sum(p.numel() for p in teacher.parameters())}, "sample": sample}
    del teacher
    runs = {"distilled": cold + traces, "baseline": cold}
    for name, data in runs.items():
        stage = dataclasses.replace(sft_cfg, out_dir=os.path.join(cfg.out_dir, name))
        model, stok, summary = run_sft(stage, examples=data, tag=name)
        results[name] = {**_score(model, stok, heldout, cfg, name, cfg.student), **summary,
                         "examples": len(data), "params": sum(p.numel() for p in model.parameters())}
    results["total_seconds"] = time.perf_counter() - t0
    results["config"] = dataclasses.asdict(cfg)
    table = distill_table(results)
    print(table, flush=True)
    os.makedirs(cfg.out_dir, exist_ok=True)
    with open(os.path.join(cfg.out_dir, "distill.json"), "w") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(cfg.out_dir, "distill.md"), "w") as f:
        f.write(table + "\n")
    return results


def _score(model, tok, heldout, cfg, name, path):
    r = evaluate(model, tok, heldout, "{question}\n", max_tokens=cfg.max_tokens)
    print(f"[eval] {name}: accuracy {r['accuracy']:.3f} format {r['format_rate']:.3f} "
          f"length {r['mean_length']:.1f} (n={r['n']})", flush=True)
    return {**r, "model": path}


def distill_table(results: dict) -> str:
    rows = [("teacher", "teacher", "-"),
            ("distilled", "student + teacher traces", "cold start + {traces} teacher traces"),
            ("baseline", "student without traces", "cold start only")]
    cold = results["config"]["num_examples"]
    lines = ["| model | parameters | SFT data | held-out accuracy | format rate | mean length | SFT steps |",
             "|---|---|---|---|---|---|---|"]
    for key, label, data in rows:
        r = results[key]
        data = data.format(traces=results["sample"]["kept"]) if key != "teacher" else "-"
        data = data.replace("cold start", f"{cold} cold-start")
        lines.append(f"| {label} | {r['params'] / 1e6:.2f}M | {data} | {100 * r['accuracy']:.1f}% | "
                     f"{100 * r['format_rate']:.1f}% | {r['mean_length']:.1f} | {r.get('steps', '-')} |")
    n, s = results["baseline"]["n"], results["sample"]
    lines.append(f"\nheld-out problems: {n} (standard error ~{100 * (0.25 / n) ** 0.5:.1f} points); teacher "
                 f"pass rate {100 * s['pass_rate']:.1f}% on {s['prompts']} prompts x {s['samples'] // max(s['prompts'], 1)}"
                 f"; total {results.get('total_seconds', 0):.0f} s")
    lines.append(f"distilled - baseline: {100 * (results['distilled']['accuracy'] - results['baseline']['accuracy']):+.1f} points")
    return "\n".join(lines)
