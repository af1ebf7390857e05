"""Rejection sampling (`reasonrl sample`): n samples per training-split prompt from a checkpoint,
keep only the verified-correct ones (rewards.accuracy_reward, and the exact training format unless
require_format=False), optionally only the shortest correct one per prompt, and write a JSONL
dataset that `reasonrl sft --task jsonl:PATH` trains on (tasks.JsonlTask reads "response" as the
worked solution).

One line per kept response:
  {"question", "answer", "response", "checker", "meta",
   "provenance": {"model", "step", "task", "difficulty", "seed", "sample_index", "temperature"}}
"step" is the checkpoint's training step from its state.json (a `final` folder borrows it from its
run's latest checkpoint), else null. The file is written to a temporary name and os.replace'd, so a
reader never sees half of it. When no sample passes, the file is still written (empty: a pipeline
reads its stage's output, and r1's rs_sft stage reports the empty set), the command exits 0, and a
WARNING on stderr says no sample passed, with no `reasonrl sft` suggestion (SFT needs
num_examples >= 1). Sampling is deterministic by seed: chunk c of the prompts samples
after torch.manual_seed(step_seed(seed, "rs", c)).
"""
from __future__ import annotations

import json
import os
import sys
import time

import torch

from reasonrl.engine import LLMEngine, SamplingParams
from reasonrl.rl.rewards import accuracy_reward, format_reward
from reasonrl.rl.tasks import JSONL_CHECKERS, get_task
from reasonrl.train.checkpoint import LATEST, write_text_atomic
from reasonrl.train.common import encode_prompt, load_model_and_tokenizer, step_seed
from reasonrl.train.config import SampleConfig


def checkpoint_step(path: str) -> int | None:
    """The training step of a model folder: its state.json, or its run's latest checkpoint's."""
    candidates = [os.path.join(path, "state.json")]
    run_dir = os.path.dirname(os.path.abspath(path))
    if os.path.isfile(os.path.join(run_dir, LATEST)):
        with open(os.path.join(run_dir, LATEST)) as f:
            candidates.append(os.path.join(run_dir, f.read().strip(), "state.json"))
    for c in candidates:
        if os.path.isfile(c):
            try:
                with open(c, encoding="utf-8") as f:
                    state = json.load(f)
            except (ValueError, UnicodeDecodeError) as e:
                raise ValueError(f"checkpoint file {c!r} is corrupt (not valid JSON: {e})") from None
            return state.get("step") if isinstance(state, dict) else None
    return None


def _record(problem, text, provenance):
    rec = {"question": problem.question, "answer": problem.answer, "response": text}
    if problem.checker in JSONL_CHECKERS and problem.checker != "math":  # plain-JSON checkers round-trip
        rec["checker"], rec["meta"] = problem.checker, problem.meta
    elif problem.checker == "score" and problem.answer.strip() in ("", "None"):
        # a scorer's problem (reasoning-gym) with no single answer: its scorer does not travel in JSON, and
        # read back as "math" its answer 'None' was matched by "<answer>None</answer>"
        rec["checker"] = "none"
    return {**rec, "provenance": provenance}


def run_sample(cfg: SampleConfig, model=None, tokenizer=None, exclude=()) -> dict:
    """Sample, verify, write cfg.out; returns the summary (prompts, samples, kept, pass rate, ...)."""
    if os.path.isdir(cfg.out):  # found only after all the sampling before
        raise ValueError(f"SampleConfig.out: {cfg.out!r} is a folder; give a file path (.jsonl)")
    if model is None:
        model, tokenizer = load_model_and_tokenizer(cfg.model, cfg.seed)
    problems = get_task(cfg.task, cfg.difficulty).problems(cfg.num_prompts, seed=cfg.seed, split="train",
                                                           exclude=exclude)
    base = {"model": cfg.model, "step": checkpoint_step(cfg.model) if os.path.isdir(cfg.model) else None,
            "task": cfg.task, "difficulty": cfg.difficulty, "seed": cfg.seed, "temperature": cfg.temperature}
    params = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens)
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    engine = LLMEngine(model, tokenizer=tokenizer, max_num_seqs=cfg.chunk_prompts * cfg.n)
    kept, n_correct, n_solved, n_samples = [], 0, 0, 0
    bar = _bar(len(problems))
    for c in range(0, len(problems), cfg.chunk_prompts):
        chunk = problems[c:c + cfg.chunk_prompts]
        torch.manual_seed(step_seed(cfg.seed, "rs", c // cfg.chunk_prompts))
        outs = engine.generate([encode_prompt(tokenizer, cfg.prompt_template, p.question) for p in chunk],
                               params, n=cfg.n)
        for p, group in zip(chunk, outs):
            good = [(comp.length, i, comp.text or "") for i, comp in enumerate(group)
                    if comp.finish_reason == "stop" and accuracy_reward(comp.text or "", p) == 1.0
                    and (not cfg.require_format or format_reward(comp.text or "") == 1.0)]
            n_samples, n_correct, n_solved = n_samples + len(group), n_correct + len(good), n_solved + bool(good)
            for _, i, text in (sorted(good)[:1] if cfg.shortest else good):
                kept.append(_record(p, text, {**base, "sample_index": i}))
        bar.update(len(chunk))
    bar.close()
    model.train(was_training)
    _write_jsonl(cfg.out, kept)
    summary = {"prompts": len(problems), "samples": n_samples, "correct": n_correct, "kept": len(kept),
               "pass_rate": n_correct / max(n_samples, 1), "solved_prompts": n_solved, "out": cfg.out,
               "seconds": time.perf_counter() - t0}
    print(f"[sample] prompts {summary['prompts']} samples {n_samples} correct {n_correct} kept {len(kept)} "
          f"pass rate {summary['pass_rate']:.3f} prompts solved {n_solved} -> {cfg.out}", flush=True)
    if kept:
        print(f"[sample] train on it (from the model that sampled it): reasonrl sft --model {cfg.model} "
              f"--task jsonl:{cfg.out} --num_examples {len(kept)}", flush=True)
    else:  # nothing to train on: say so, suggest no command (SFT rejects an empty dataset)
        why = "verified correct" + (" in the training format" if cfg.require_format else "")
        print(f"[sample] WARNING: no sample passed: none of the {n_samples} samples was {why} (and finished "
              f"within max_tokens={cfg.max_tokens}); {cfg.out} is empty and there is nothing to train on. "
              "Try a better-trained model, more samples (--n, --num_prompts), a larger --max_tokens"
              + (" or --require_format false" if cfg.require_format else "") + ".", file=sys.stderr, flush=True)
    return summary


def _write_jsonl(path: str, rows: list[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _bar(total):
    from reasonrl.train.common import progress_bar
    return progress_bar(total, "sample", "prompt")
