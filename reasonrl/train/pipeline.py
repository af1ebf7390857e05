"""`reasonrl train`: cold-start SFT -> GRPO, beside a fair SFT control, then held-out accuracy.

(With --stages or a config that sets `stages`, `reasonrl train` runs the whole R1 pipeline
instead: train/r1.py. The no-argument run below is unchanged.)

1. SFT on a small fixed set of worked examples (the cold start).
2. GRPO from the SFT weights on new training-split questions (final answers only).
3. The control: SFT continued from the same SFT weights, on the same cold-start set, for the
   GRPO stage's measured wall time, with its own carefully chosen lr (control_lr; benchmarks/RESULTS.md
   found 1e-4..3e-4 best and 1e-3 unfair).
4. Greedy accuracy, format rate and mean response length of the three models on held-out problems
   (the test split: never trained on by construction, see rl/tasks.py).

Measured 2026-11-26 on the 2-core CPU machine (two seeds side by side, 1 thread each), defaults,
500 held-out problems: seed 0 SFT 950 steps -> 68.4%, GRPO 217 steps / 240 s -> 82.2%, control 765
steps / 241 s -> 68.2% (+14.0); seed 1 63.2% -> 75.4% against 64.2% (+11.2); about 800 s each
(benchmarks/RESULTS.md). The cold start runs by steps: under load a time budget gave it too few
(303 steps -> 15.6% once), and RL needs a cold start that has mostly plateaued (benchmarks/RESULTS.md).
"""
from __future__ import annotations

import dataclasses
import json
import os
import time

from reasonrl.rl.tasks import get_task
from reasonrl.train.checkpoint import set_aside_previous_run, write_text_atomic
from reasonrl.train.common import copy_model, evaluate, preflight
from reasonrl.train.config import TrainConfig
from reasonrl.train.grpo import run_grpo
from reasonrl.train.sft import run_sft, sft_examples


def run_train(cfg: TrainConfig) -> dict:
    t_start = time.perf_counter()
    out = cfg.out_dir
    sft_cfg = dataclasses.replace(cfg.sft, seed=cfg.seed, out_dir=os.path.join(out, "sft"),
                                  resume=cfg.resume or cfg.sft.resume)
    grpo_cfg = dataclasses.replace(cfg.grpo, seed=cfg.seed, out_dir=os.path.join(out, "grpo"),
                                   resume=cfg.resume or cfg.grpo.resume)
    preflight([("TrainConfig.sft", sft_cfg), ("TrainConfig.grpo", grpo_cfg)], sft_cfg.model)
    heldout = get_task(cfg.grpo.task, cfg.grpo.difficulty).problems(cfg.eval_problems, seed=cfg.seed, split="test")
    examples = sft_examples(sft_cfg)

    def score(model, tok, name):
        r = evaluate(model, tok, heldout, cfg.grpo.prompt_template, max_tokens=cfg.grpo.max_tokens)
        print(f"[eval] {name}: accuracy {r['accuracy']:.3f} format {r['format_rate']:.3f} "
              f"length {r['mean_length']:.1f} (n={r['n']})", flush=True)
        return r

    model, tok, sft_sum = run_sft(sft_cfg, examples=examples)
    results = {"sft": {**score(model, tok, "after SFT"), **sft_sum}}
    control_model = copy_model(model).cpu() if cfg.control else None  # parked off the GPU during GRPO;
    # its SFT stage moves it to its device

    model, tok, grpo_sum = run_grpo(grpo_cfg, model=model, tokenizer=tok,
                                    exclude={p.question for p in examples})
    results["grpo"] = {**score(model, tok, "after GRPO"), **grpo_sum}

    if cfg.control:
        ctrl_cfg = dataclasses.replace(sft_cfg, lr=cfg.control_lr, steps=10**9, max_seconds=grpo_sum["seconds"],
                                       warmup_steps=min(sft_cfg.warmup_steps, 10), resume=False,
                                       out_dir=os.path.join(out, "control"))
        # its own words: under `train --resume` the hint "pass --resume" read as if the flag were missing
        set_aside_previous_run(ctrl_cfg.out_dir, "control", "the control reruns in full, for the GRPO stage's time")
        control_model, _, ctrl_sum = run_sft(ctrl_cfg, model=control_model, tokenizer=tok, examples=examples,
                                             tag="control")
        results["control"] = {**score(control_model, tok, "SFT control"), **ctrl_sum}

    results["total_seconds"] = time.perf_counter() - t_start
    results["config"] = dataclasses.asdict(cfg)
    table = results_table(results)
    print(table, flush=True)
    os.makedirs(out, exist_ok=True)
    write_text_atomic(os.path.join(out, "results.json"), json.dumps(results, indent=2))  # a crash keeps the old one
    write_text_atomic(os.path.join(out, "results.md"), table + "\n")
    return results


def results_table(results: dict) -> str:
    names = {"sft": "after SFT", "grpo": "after GRPO", "control": "SFT control (same wall time)"}
    lines = ["| model | held-out accuracy | format rate | mean length | stage steps | stage seconds |",
             "|---|---|---|---|---|---|"]
    for k, label in names.items():
        if k in results:
            r = results[k]
            lines.append(f"| {label} | {100 * r['accuracy']:.1f}% | {100 * r['format_rate']:.1f}% | "
                         f"{r['mean_length']:.1f} | {r['steps']} | {r['seconds']:.0f} |")
    n = results["sft"]["n"]
    lines.append(f"\nheld-out problems: {n} (standard error ~{100 * (0.25 / n) ** 0.5:.1f} points); "
                 f"total {results.get('total_seconds', 0):.0f} s")
    if "control" in results:
        lines.append(f"GRPO - control: {100 * (results['grpo']['accuracy'] - results['control']['accuracy']):+.1f} points")
    return "\n".join(lines)
