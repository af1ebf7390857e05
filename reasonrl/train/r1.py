"""The whole R1 pipeline from one config: cold-start SFT -> GRPO -> rejection sampling -> SFT on the
kept samples -> multi-task GRPO (DeepSeek-R1's four stages, at the sizes a CPU allows).

    reasonrl train --config reasonrl/train/r1_small.toml            # the shipped example (below)
    reasonrl train --config reasonrl/train/r1_small.toml --resume   # after an interruption
    reasonrl train --stages sft,grpo,sample,rs_sft,mt_grpo --out_dir runs/r1   # PipelineConfig defaults

`reasonrl train` with no arguments stays the default run of pipeline.py; a `stages` field (flag or
TOML) selects this one (PipelineConfig, config.py; `reasonrl train --stages all --help` lists its
fields). Stage names: sft, grpo, sample, rs_sft, mt_grpo; any subsequence of that order runs.

Each stage writes into out_dir/<stage>/ and starts from the previous model stage's final folder
(loaded from disk, so a resumed pipeline and an uninterrupted one start every stage from the same
bytes). rs_sft trains on the sample stage's JSONL (all kept responses); the sample stage samples
from the latest model. After each model stage, greedy held-out accuracy on every eval task.

Resume: a stage that finished wrote out_dir/<stage>/DONE.json (atomically, after its final save):
with --resume it is skipped (its recorded config must match, else a clear error), and the first
unfinished stage resumes from its latest checkpoint (checkpoint.resume_or_start). A run without
--resume deletes old markers first. `stop_after` ends the run after one stage (a stage limit).
Results: out_dir/results.json and results.md (one row per stage).

r1_small.toml measured 2026-11-26 on the shared 2-core CPU machine (1 thread, load 4-11 from other
work), seed 0, 100 held-out problems per task (standard error ~5 points), difficulty 3:
  stage    steps  seconds  multiply  add
  sft        600      603     47.0%  39.0%
  grpo        30       74     51.0%  35.0%
  sample       -        3     kept 127 of 512 samples (pass rate 93.8%, the shortest per prompt)
  rs_sft     100       25     48.0%  32.0%
  mt_grpo     30       63     51.0%  38.0%     785 s in all
The stages run and hand on their models; at these sizes the later stages move accuracy by less
than the standard error (a demonstration of the machinery, not of gains).
"""
from __future__ import annotations

import dataclasses
import json
import os
import time

from reasonrl.rl.tasks import get_task
from reasonrl.train.checkpoint import write_text_atomic
from reasonrl.train.common import evaluate, preflight
from reasonrl.train.config import STAGES, PipelineConfig
from reasonrl.train.grpo import run_grpo
from reasonrl.train.sample import run_sample
from reasonrl.train.sft import run_sft, sft_examples

DONE = "DONE.json"
EXAMPLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "r1_small.toml")


def run_pipeline(cfg: PipelineConfig) -> dict:
    t0 = time.perf_counter()
    stages, out = cfg.stage_list(), cfg.out_dir
    if not cfg.resume:
        for s in STAGES:
            if os.path.isfile(os.path.join(out, s, DONE)):
                os.remove(os.path.join(out, s, DONE))
    preflight([(f"PipelineConfig.{name}", stage_config(cfg, name, None)) for name in stages],
              stage_config(cfg, stages[0], None).model,
              skip_task=("PipelineConfig.rs_sft",) if "sample" in stages else ())  # the sample stage writes it
    heldout = {t: get_task(t, cfg.grpo.difficulty).problems(cfg.eval_problems, seed=cfg.seed, split="test")
               for t in cfg.eval_task_list()} if cfg.eval_problems else {}
    model_dir, results = None, {"stages": {}}
    for name in stages:
        sc = stage_config(cfg, name, model_dir)
        marker = os.path.join(out, name, DONE)
        if cfg.resume and os.path.isfile(marker):
            done = _read_marker(marker, name, sc)
            print(f"[pipeline] {name}: finished earlier ({marker}); skipped", flush=True)
        else:
            print(f"[pipeline] {name}: starting" + (f" from {model_dir}" if model_dir else ""), flush=True)
            done = {"stage": name, "config": _comparable(sc, out), **RUNNERS[name](cfg, sc, heldout)}
            _write_json_atomic(marker, done)
        results["stages"][name] = done
        if name == "sample":  # the model it sampled from goes on (a pipeline that starts here trained the
            model_dir = sc.model  # next stage from random weights)
        elif done.get("model"):  # this run's folder, not the path the marker recorded (a moved run folder)
            model_dir = os.path.join(sc.out_dir, "final")
        if name == cfg.stop_after:
            print(f"[pipeline] stop_after={name}: stopping (--resume continues)", flush=True)
            break
    results.update(final_model=model_dir, completed=list(results["stages"]),
                   total_seconds=time.perf_counter() - t0, config=dataclasses.asdict(cfg))
    table = pipeline_table(results)
    print(table, flush=True)
    _write_json_atomic(os.path.join(out, "results.json"), results)
    write_text_atomic(os.path.join(out, "results.md"), table + "\n")
    return results


def stage_config(cfg: PipelineConfig, name: str, model_dir: str | None):
    """The stage's own config with the pipeline's seed, folders, resume flag and input model."""
    base = getattr(cfg, name)
    kw = {"seed": cfg.seed, "model": model_dir or base.model}
    if name == "sample":
        return dataclasses.replace(base, out=os.path.join(cfg.out_dir, "sample", "samples.jsonl"), **kw)
    kw.update(out_dir=os.path.join(cfg.out_dir, name), resume=cfg.resume)
    if name == "rs_sft" and "sample" in cfg.stage_list():
        path = os.path.join(cfg.out_dir, "sample", "samples.jsonl")
        kw.update(task=f"jsonl:{path}", num_examples=max(1, _count_lines(path)))
    return dataclasses.replace(base, **kw)


def _count_lines(path):
    if not os.path.isfile(path):
        return 0
    with open(path) as f:
        return sum(1 for line in f if line.strip())


def _eval_all(model, tok, heldout, cfg):
    scores = {}
    for task, problems in heldout.items():
        r = evaluate(model, tok, problems, cfg.grpo.prompt_template, max_tokens=cfg.grpo.max_tokens)
        print(f"[eval] {task}: accuracy {r['accuracy']:.3f} format {r['format_rate']:.3f} "
              f"length {r['mean_length']:.1f} (n={r['n']})", flush=True)
        scores[task] = r
    return scores


def _sft_stage(cfg, sc, heldout):
    model, tok, summary = run_sft(sc, tag=os.path.basename(sc.out_dir))
    return {"model": os.path.join(sc.out_dir, "final"), "summary": summary, "eval": _eval_all(model, tok, heldout, cfg)}


def _rs_sft_stage(cfg, sc, heldout):
    if sc.task.startswith("jsonl:") and _count_lines(sc.task[len("jsonl:"):]) == 0:
        raise ValueError(f"PipelineConfig.rs_sft: the sample stage kept no responses ({sc.task[6:]} is empty); "
                         "raise sample.n / sample.num_prompts or train the earlier stages longer")
    return _sft_stage(cfg, sc, heldout)


def _grpo_stage(cfg, sc, heldout):
    exclude = set()
    if "sft" in cfg.stage_list():  # GRPO asks new questions, never the cold-start ones
        exclude = {p.question for p in sft_examples(stage_config(cfg, "sft", None))}
    model, tok, summary = run_grpo(sc, exclude=exclude, tag=os.path.basename(sc.out_dir))
    return {"model": os.path.join(sc.out_dir, "final"), "summary": summary, "eval": _eval_all(model, tok, heldout, cfg)}


def _sample_stage(cfg, sc, heldout):
    return {"model": None, "summary": run_sample(sc), "data": sc.out}


RUNNERS = {"sft": _sft_stage, "grpo": _grpo_stage, "sample": _sample_stage, "rs_sft": _rs_sft_stage,
           "mt_grpo": _grpo_stage}


_PATH_FIELDS = ("out_dir", "out", "model", "task")


def _comparable(sc, root: str) -> dict:
    """The stage's config as its DONE marker records it and --resume compares it: without `resume`, and
    with paths inside the pipeline's out_dir written relative to it ("<out_dir>/sft/final"), so that the
    same folder spelled another way (./runs/r1, an absolute path) or a moved run folder still resumes."""
    d = dataclasses.asdict(sc) if dataclasses.is_dataclass(sc) else dict(sc)
    d.pop("resume", None)
    base = os.path.realpath(root)
    for k in _PATH_FIELDS:
        v = d.get(k)
        if not isinstance(v, str) or not v or v.startswith("<out_dir>"):
            continue
        pre, path = ("jsonl:", v[6:]) if k == "task" and v.startswith("jsonl:") else ("", v)
        if k == "task" and not pre:
            continue  # a task name, not a path
        real = os.path.realpath(path)
        if real == base or real.startswith(base + os.sep):
            d[k] = pre + "<out_dir>" + real[len(base):]
    return d


def _read_marker(path, name, sc) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            done = json.load(f)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        done = f"not valid JSON: {e}"
    if not (isinstance(done, dict) and isinstance(done.get("config"), dict)):
        why = done if isinstance(done, str) else "no 'config' object"
        raise ValueError(f"PipelineConfig.{name}: the marker {path!r} of the finished stage is corrupt ({why}); "
                         "delete it to run the stage again (its own --resume picks up its checkpoints)")
    root = os.path.dirname(os.path.dirname(path))  # out_dir/<stage>/DONE.json
    now, then = _comparable(sc, root), _comparable(done["config"], root)  # (markers before 2026-11-29: as written)
    diff = sorted(k for k in set(now) | set(then) if now.get(k) != then.get(k))
    if diff:
        k = diff[0]
        raise ValueError(f"PipelineConfig.{name}: --resume, but the finished stage in {os.path.dirname(path)} used "
                         f"{name}.{k}={then.get(k)!r}, now {now.get(k)!r}; use a new out_dir or drop --resume")
    return done


def _write_json_atomic(path, obj):
    write_text_atomic(path, json.dumps(obj, indent=2))


def pipeline_table(results: dict) -> str:
    tasks = sorted({t for d in results["stages"].values() for t in d.get("eval", {})})
    head = ["stage", "steps", "seconds", *(f"held-out {t}" for t in tasks), "notes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, d in results["stages"].items():
        s = d.get("summary", {})
        accs = [f"{100 * d['eval'][t]['accuracy']:.1f}%" if t in d.get("eval", {}) else "-" for t in tasks]
        note = (f"kept {s['kept']} of {s['samples']} samples (pass rate {100 * s['pass_rate']:.1f}%)"
                if name == "sample" else "")
        lines.append("| " + " | ".join([name, str(s.get("steps", "-")), f"{s.get('seconds', 0):.0f}", *accs, note]) + " |")
    n = next((d["eval"][t]["n"] for d in results["stages"].values() for t in d.get("eval", {})), 0)
    stage_s = sum(d.get("summary", {}).get("seconds", 0) for d in results["stages"].values())
    lines.append(f"\nheld-out problems per task: {n}; final model: {results['final_model']}; "
                 f"stages {stage_s:.0f} s (this invocation {results['total_seconds']:.0f} s)")
    return "\n".join(lines)
