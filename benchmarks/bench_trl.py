"""One GRPO configuration in reasonrl and in TRL's GRPOTrainer: seconds per step and peak memory.

Same model (the built-in tiny config, random init by seed, saved as a Hugging Face folder that both
load; or --model DIR, e.g. SmolLM2-135M-Instruct from `reasonrl convert-gguf`), same prompts
(multiply task, --template around each question), P prompts x G samples at temperature 1, same max
completion length, beta 0, one optimizer pass per batch (mu / num_iterations = 1), token-level
"dapo" loss, AdamW at the same lr, grad clipping 1, no gradient checkpointing, no dynamic sampling.
EOS is ignored on both sides (reasonrl: SamplingParams.ignore_eos; TRL: min_new_tokens =
max_tokens), so both generate exactly max_tokens per completion: equal work.

Each backend runs in its own subprocess so that peak memory (ru_maxrss: CPU resident set, or
torch.cuda.max_memory_allocated on GPU) is its own; on CPU also the peak above the resident set after
each side's imports (TRL's libraries are the larger part of its small-model peak). TRL is an optional extra (pip install trl).
reasonrl's side keeps freed memory in its heap as run_grpo does (train.common.keep_freed_memory;
REASONRL_KEEP_HEAP=0 turns that off); TRL runs with glibc's defaults.

    python benchmarks/bench_trl.py [--steps 3] [--prompts 16] [--group 8] [--max-tokens 48] [--model DIR]
                                   [--no-share-prefix] [--bf16] [--bf16-rollouts]
reasonrl packs each group's prompt once in training (GRPOConfig.share_prefix, same gradients);
--no-share-prefix packs prompt+completion G times, as TRL does.

The floor printed last: the linear layers' matmul FLOPs of the completion tokens alone (2 per weight
per generated token, 6 per weight per trained token; prompts and attention left out, so a lower bound)
at the matmul rate measured in the same run (common.ceilings: a square fp32 GEMM on CPU, with the
benchmark's threads), beside a third of TRL's step: where the floor is above it, no trainer that
samples and then runs the training forward and backward (as both do) can be 3x TRL's step on this
machine at this configuration (the matmuls of these shapes run below the square GEMM's rate, too).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time


def _setup(args):
    import torch

    from reasonrl.models import builtin_path, init_model, load_tokenizer, save_model
    from reasonrl.rl.tasks import get_task

    torch.manual_seed(args.seed)
    path = args.model if args.model != "tiny" else os.path.join(args.workdir, "model")
    if not os.path.isdir(path):
        save_model(init_model(builtin_path("tiny"), seed=args.seed), path, tokenizer=load_tokenizer(builtin_path("tiny")))
    problems = get_task("multiply").problems(args.prompts * (args.steps + 1), seed=args.seed)
    return path, problems


def run_reasonrl(args):
    import torch

    from reasonrl.ops.grpo import GRPOLossConfig
    from reasonrl.rl.rewards import parse_reward_spec
    from reasonrl.train.common import keep_freed_memory, load_model_and_tokenizer, make_optimizer
    from reasonrl.train.config import GRPOConfig
    from reasonrl.train.grpo import rollout, train_on_groups

    path, problems = _setup(args)
    model, tok = load_model_and_tokenizer(path)
    keep_freed_memory(next(model.parameters()).device)  # as run_grpo does (REASONRL_KEEP_HEAP=0: off)
    cfg = GRPOConfig(prompts_per_step=args.prompts, group_size=args.group, max_tokens=args.max_tokens, lr=1e-4,
                     dynamic_sampling=False, truncation="keep", loss_type="dapo", micro_batch_tokens=1 << 20,
                     prompt_template=args.template, share_prefix=not args.no_share_prefix,
                     precision="bf16" if args.bf16 else "fp32")
    loss_cfg = GRPOLossConfig(loss_type="dapo", max_completion_length=args.max_tokens)
    opt, spec = make_optimizer(model, cfg), parse_reward_spec(cfg.rewards)
    engine = _IgnoreEOS(model, tokenizer=tok, max_num_seqs=args.prompts * args.group,
                        dtype=torch.bfloat16 if args.bf16_rollouts else None)
    tasks = [("multiply", _FixedTask(problems, args.prompts), spec, 1.0)]
    times = []
    for step in range(args.steps + 1):  # step 0 warms up
        t0 = time.perf_counter()
        groups, _ = rollout(engine, tok, tasks, cfg, step, set())
        train_on_groups(model, None, opt, groups, cfg, loss_cfg)
        times.append(time.perf_counter() - t0)
    return times[1:]


def _IgnoreEOS(*a, **kw):
    """An LLMEngine whose requests ignore EOS: every completion is max_tokens long, as on TRL's side."""
    import dataclasses

    from reasonrl.engine import LLMEngine

    class Engine(LLMEngine):
        def generate(self, prompts, params=None, n=1, use_tqdm=False):
            return super().generate(prompts, dataclasses.replace(params, ignore_eos=True), n=n, use_tqdm=use_tqdm)

    return Engine(*a, **kw)


class _FixedTask:
    """The benchmark's prompts in order, so that both trainers see the same questions."""
    def __init__(self, problems, per_step):
        self.problems_, self.per_step, self.i = problems, per_step, 0

    def problems(self, n, seed, split="train", exclude=()):
        out = self.problems_[self.i:self.i + n]
        self.i += n
        return out


def run_trl(args):
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from reasonrl.rl.rewards import accuracy_reward, format_reward
    from reasonrl.rl.tasks import Problem

    path, problems = _setup(args)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(path)
    data = Dataset.from_list([{"prompt": args.template.format(question=p.question), "answer": p.answer}
                              for p in problems])

    def reward(completions, answer, **kw):
        return [accuracy_reward(c, Problem("", a)) + 0.1 * format_reward(c) for c, a in zip(completions, answer)]

    times, t0 = [], [0.0]

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            t0[0] = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - t0[0])

    n = args.prompts * args.group
    cfg = GRPOConfig(output_dir=os.path.join(args.workdir, "trl"), per_device_train_batch_size=n,
                     num_generations=args.group, max_completion_length=args.max_tokens, learning_rate=1e-4,
                     beta=0.0, temperature=1.0, loss_type="dapo", num_iterations=1, max_steps=args.steps + 1,
                     gradient_checkpointing=False, use_cpu=not torch.cuda.is_available(),
                     report_to="none", save_strategy="no", logging_steps=1, shuffle_dataset=False,
                     max_grad_norm=1.0, warmup_steps=0, lr_scheduler_type="constant", seed=args.seed, bf16=args.bf16,
                     disable_tqdm=True, generation_kwargs={"min_new_tokens": args.max_tokens})
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=cfg, train_dataset=data, processing_class=tok,
                          callbacks=[Timer()])
    trainer.train()
    return times[1:]


def _rss_mib():
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from common import proc_kib
    try:
        return proc_kib("VmRSS") / 1024
    except OSError:
        return None


def child(args):
    import torch
    torch.set_num_threads(args.threads)
    # each side's libraries imported first: the resident set then is the baseline of "above imports"
    # (TRL's imports alone are ~550 MiB against ~225 for ours: the whole-process peak counts them too)
    if args.backend == "reasonrl":
        import reasonrl.train.grpo  # noqa: F401
    else:
        import datasets  # noqa: F401
        import trl  # noqa: F401
    base = _rss_mib()
    times = (run_reasonrl if args.backend == "reasonrl" else run_trl)(args)
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated() / 2**20
        kind = "cuda_allocated"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        kind = "cpu_max_rss"
    above = peak - base if kind == "cpu_max_rss" and base is not None else None
    print(json.dumps({"backend": args.backend, "s_per_step": statistics.median(times), "steps": times,
                      "peak_mib": peak, "peak_kind": kind, "imports_mib": base if above is not None else None,
                      "peak_above_imports_mib": above}))


def matmul_floor(args, workdir):
    """-> (FLOPs per step of the completion tokens' linear layers, the matmul FLOP/s measured now), or None
    (a config this count does not know: MoE)."""
    import torch

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from common import ceilings
    path = args.model if args.model != "tiny" else os.path.join(workdir, "model")
    with open(os.path.join(path, "config.json")) as f:
        c = json.load(f)
    if any(k in c for k in ("num_experts", "num_local_experts", "n_routed_experts")):
        return None
    H, inter, L, V = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    D = c.get("head_dim") or H // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * D, c.get("num_key_value_heads", c["num_attention_heads"]) * D
    weights = L * (H * q + 2 * H * kv + q * H + 3 * H * inter) + V * H  # the LM head too (tied or not)
    tokens = args.prompts * args.group * args.max_tokens
    torch.set_num_threads(args.threads)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rate = ceilings(dev, torch.bfloat16 if args.bf16 else torch.float32)["mm_flops"]
    return (2 + 6) * weights * tokens, rate


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=["both", "reasonrl", "trl"], default="both")
    p.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up step)")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None)
    p.add_argument("--model", default="tiny", help="'tiny' (built-in config, random init) or a model folder")
    p.add_argument("--template", default="{question}\n", help="prompt template around each question")
    p.add_argument("--no-share-prefix", action="store_true",
                   help="reasonrl packs each group's prompt G times, as TRL does (an ablation)")
    p.add_argument("--bf16", action="store_true",
                   help="bf16 autocast training on both sides (reasonrl precision=bf16, TRL bf16=True); weights fp32")
    p.add_argument("--bf16-rollouts", action="store_true",
                   help="reasonrl's rollouts on a bf16 cast of the weights (GRPOConfig.rollout_dtype='bf16')")
    p.add_argument("--json", default=None, help="also write the summary (the last line printed) to this file")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench-trl-")
    results = []
    for backend in (["reasonrl", "trl"] if args.backend == "both" else [args.backend]):
        cmd = [sys.executable, __file__, "--child", "--backend", backend, "--workdir", workdir] + \
              [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
               if k in ("steps", "prompts", "group", "max_tokens", "threads", "seed", "model", "template")] + \
              (["--no-share-prefix"] if args.no_share_prefix else []) + (["--bf16"] if args.bf16 else []) + \
              (["--bf16-rollouts"] if args.bf16_rollouts else [])
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            tail = r.stderr.strip().splitlines()[-3:]
            print(f"{backend}: failed ({' | '.join(tail)})")
            continue
        results.append(json.loads(r.stdout.strip().splitlines()[-1]))
    print(f"\nGRPO step, model {args.model}, {args.prompts} prompts x {args.group} samples, {args.max_tokens} new tokens, "
          f"{args.threads} thread(s), reasonrl share_prefix={not args.no_share_prefix}, "
          f"training precision {'bf16 autocast' if args.bf16 else 'fp32'}, "
          f"reasonrl rollouts {'bf16 cast' if args.bf16_rollouts else 'on the weights'}")
    print(f"{'backend':<10} {'s/step (median)':>16} {'peak MiB':>10} {'above imports':>14}  steps")
    for r in results:
        above = r.get("peak_above_imports_mib")
        print(f"{r['backend']:<10} {r['s_per_step']:>16.3f} {r['peak_mib']:>10.0f} "
              f"{'-' if above is None else f'{above:.0f}':>14}  " + " ".join(f"{t:.2f}" for t in r["steps"]))
    by = {r["backend"]: r for r in results}
    summary = {"results": results}
    if len(by) == 2:
        summary["speedup"] = by["trl"]["s_per_step"] / by["reasonrl"]["s_per_step"]
        summary["memory_ratio"] = by["reasonrl"]["peak_mib"] / by["trl"]["peak_mib"]
        a, b = by["reasonrl"].get("peak_above_imports_mib"), by["trl"].get("peak_above_imports_mib")
        summary["memory_ratio_above_imports"] = a / b if a is not None and b else None
        print(f"speed-up vs TRL: {summary['speedup']:.2f}x; memory reasonrl/TRL: {summary['memory_ratio']:.2f} "
              "(whole process)" + ("" if summary["memory_ratio_above_imports"] is None else
                                   f", {summary['memory_ratio_above_imports']:.2f} (above each side's imports)"))
    elif args.backend == "both":  # a side failed: said so, and the exit status says it too
        print("no comparison: a backend failed above; ratio not reported")
    floor = matmul_floor(args, workdir) if results else None
    if floor is not None:
        fl, rate = floor
        summary["floor_s"], summary["mm_flops"] = fl / rate, rate
        third = f"; a third of TRL's step: {by['trl']['s_per_step'] / 3:.3f} s" if "trl" in by else ""
        print(f"floor: {fl / 1e9:.1f} GFLOP per step (completion tokens' linear layers, generation + training) "
              f"at the measured {rate / 1e9:.0f} GFLOP/s: {fl / rate:.3f} s{third}")
    print(json.dumps(summary))
    if args.json:
        with open(args.json, "w") as f:
            f.write(json.dumps(summary) + "\n")
    if args.backend == "both" and len(by) < 2:
        sys.exit(1)


if __name__ == "__main__":
    main()
