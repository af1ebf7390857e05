"""The GRPO loop: rollout -> rewards -> (dynamic sampling) -> micro-batched grpo_loss -> AdamW -> log.

Each step: P prompts x G samples from the engine (the model's own weights, no copy), rewards per
completion, groups whose rewards are all equal dropped and refilled with new prompts (DAPO's
dynamic sampling), truncated completions masked (or penalized), then micro-batches of whole groups
within a token budget, each a packed forward (a group's prompt packed once: cfg.share_prefix,
common.pack_shared) -> ops.grpo_loss on hidden states + the LM-head weight
(advantages are computed inside the op from the raw rewards), backward; one AdamW step per pass.
With mu > 1 the batch is reused, and the old policy's log-probs come from the no-grad fused op.

Multi-task (cfg.tasks = "multiply=0.6;countdown=0.4|accuracy:1.0,format:0.1", rl/tasks.py
parse_task_mix): each prompt's task is drawn by weight, its group scored by that task's reward
spec (default cfg.rewards; "rm:FOLDER" is a learned reward model), and the log adds reward/<task>,
accuracy/<task> and groups/<task> (prompts drawn, before dynamic sampling).
"""
from __future__ import annotations

import dataclasses
import os
import random
import sys
import time

import torch

from reasonrl.engine import LLMEngine, SamplingParams
from reasonrl.ops import linear_token_logprobs
from reasonrl.ops.grpo import GRPOLossConfig, grpo_loss
from reasonrl.rl.rewards import compute_rewards, format_reward, parse_reward_spec
from reasonrl.rl.tasks import get_task, parse_task_mix
from reasonrl.train.checkpoint import (StepGuard, hold_signals, on_interrupt, on_nonfinite, resume_or_start,
                                       save_checkpoint)
from reasonrl.train.common import (BUILTIN_MODELS, autocast, common_template_len, copy_model, encode_prompt, keep_freed_memory,
                                   load_model_and_tokenizer, lr_at, make_optimizer, moe_aux_loss, pack, pack_shared,
                                   resolve_device, StageBar, step_seed, token_budget_batches, warn_if_slow_bf16,
                                   warn_if_warmup_outlasts)
from reasonrl.train.config import GRPOConfig
from reasonrl.train.logger import plot_metrics
from reasonrl.models import save_model

LOG_KEYS = ("step", "reward", "accuracy", "format", "length", "kl", "clip_frac", "entropy", "groups",
            "rollout_tok_s", "train_tok_s")


def rollout(engine, tokenizer, tasks, cfg: GRPOConfig, step: int, exclude):
    """Sample groups until prompts_per_step groups with reward variance (or refills run out).

    `tasks`: [(name, Task, reward spec, weight)]; with several, each prompt's task is drawn by
    weight (draw_problems). filter_on="accuracy" (DAPO) keeps a group only when its accuracy
    varies: a group that is all wrong but differs in format would otherwise get full-size
    advantages (std-normalized) for format alone. Measured on this machine (2026-11-26): from a
    16%-accurate SFT model, filtering on the total reward drove held-out accuracy to 0% in 67
    steps (format-only answers)."""
    kept, stats = [], {"rollout_tokens": 0, "rollout_s": 0.0, "all": []}
    used = set()  # this step's questions: a refill draws new ones (a dropped group's question came back
    for refill in range(cfg.max_refills + 1 if cfg.dynamic_sampling else 1):  # in 193 of 200 steps, 300 lines)
        need = cfg.prompts_per_step - len(kept)
        try:
            drawn = draw_problems(tasks, need, cfg.seed, step, refill, exclude | used if used else exclude)
        except ValueError:  # a small dataset without that many unused questions: this step's may come again
            drawn = draw_problems(tasks, need, cfg.seed, step, refill, exclude)
        used.update(p.question for _, p in drawn)
        prompts = [encode_prompt(tokenizer, cfg.prompt_template, p.question) for _, p in drawn]
        torch.manual_seed(step_seed(cfg.seed, "sample", step, refill))  # the engine's per-sample seeds
        t0 = time.perf_counter()
        params = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens)
        outs = engine.generate(prompts, params, n=cfg.group_size)
        stats["rollout_s"] += time.perf_counter() - t0
        for (t, prob), prompt, group in zip(drawn, prompts, outs):
            texts = [c.text or "" for c in group]
            total, parts = compute_rewards(texts, [prob] * len(group), tasks[t][2])
            if cfg.truncation == "penalize":
                total = [cfg.truncation_reward if c.finish_reason == "length" else r for c, r in zip(group, total)]
            g = {"prompt": prompt, "completions": group, "rewards": total, "parts": parts, "texts": texts,
                 "task": tasks[t][0]}
            stats["rollout_tokens"] += sum(c.length for c in group)
            stats["all"].append(g)
            key = parts["accuracy"] if cfg.filter_on == "accuracy" and "accuracy" in parts else total
            if not cfg.dynamic_sampling or max(key) > min(key):
                kept.append(g)
        if len(kept) >= cfg.prompts_per_step:
            break
    return kept[:cfg.prompts_per_step], stats


def make_tasks(cfg: GRPOConfig):
    """[(name, Task, reward spec, weight)]: cfg.task alone, or the cfg.tasks mix (its per-task
    |REWARDS, else cfg.rewards)."""
    if not cfg.tasks:
        return [(cfg.task, get_task(cfg.task, cfg.difficulty), parse_reward_spec(cfg.rewards), 1.0)]
    out = []
    for name, w, rw in parse_task_mix(cfg.tasks):
        task = get_task(name, cfg.difficulty)
        out.append((task.name, task, parse_reward_spec(rw or cfg.rewards), w))  # task.name: jsonl:<basename>
    return out


def draw_problems(tasks, n, seed, step, refill, exclude):
    """n (task index, Problem) pairs; with a mix each slot's task is drawn by weight, then every
    task makes its share of distinct problems. Seeded by (seed, step, refill): a resumed run
    redraws the same ones."""
    if len(tasks) == 1:  # one task: the draw of the single-task runs, unchanged
        return [(0, p) for p in tasks[0][1].problems(n, seed=step_seed(seed, "grpo", step, refill), exclude=exclude)]
    rng = random.Random(step_seed(seed, "mix", step, refill))
    picks = rng.choices(range(len(tasks)), weights=[t[3] for t in tasks], k=n)
    return [(i, p) for i, (name, task, _, _) in enumerate(tasks)
            for p in task.problems(picks.count(i), seed=step_seed(seed, "grpo", step, refill, name), exclude=exclude)]


def train_on_groups(model, ref_model, opt, groups, cfg: GRPOConfig, loss_cfg: GRPOLossConfig):
    """mu optimizer passes over the batch, micro-batched by token budget; returns metric sums."""
    prompts = [g["prompt"] for g in groups for _ in g["completions"]]
    comps = [c for g in groups for c in g["completions"]]
    responses = [c.token_ids for c in comps]
    rewards = torch.tensor([r for g in groups for r in g["rewards"]], dtype=torch.float32)
    truncated = torch.tensor([c.finish_reason == "length" for c in comps])
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    G, share = cfg.group_size, cfg.share_prefix
    # tokens each completion adds to a forward: with shared prefixes a group's prompt counts once, and
    # a prefix common to every prompt (a chat template; pack_shared packs it once per forward) counts
    # once per micro-batch: taken off the budget, not off each group
    common = common_template_len([g["prompt"] for g in groups]) if share else 0
    cost = [len(r) + (len(p) - common if i % G == 0 else 0) for i, (p, r) in enumerate(zip(prompts, responses))] \
        if share else lengths
    chunks = token_budget_batches(cost, max(cfg.micro_batch_tokens - common, 1), unit=G)
    W = model.lm_head_weight
    active = sum(len(r) for r, t in zip(responses, truncated) if not (t and cfg.truncation == "mask"))
    cache = {}  # micro-batch index -> (old, ref) log-probs, fixed before the first update

    dev = W.device
    rewards = rewards.to(dev)

    def batch(idx):
        if share:  # chunks hold whole groups
            ids, pos, ctx, rows = pack_shared([prompts[i] for i in idx], [responses[i] for i in idx], G, device=dev)
        else:
            ids, pos, ctx, _, rows = pack([prompts[i] for i in idx], [responses[i] for i in idx], device=dev)
        T = rows.shape[1]
        lens = torch.tensor([len(responses[i]) for i in idx])
        mask = (torch.arange(T)[None, :] < lens[:, None]).float()  # (B, T)
        if cfg.truncation == "mask":
            mask *= (~truncated[idx]).float()[:, None]
        resp_ids = torch.tensor([responses[i] + [0] * (T - len(responses[i])) for i in idx])  # (B, T)
        return ids, pos, ctx, rows, resp_ids.to(dev), mask.to(dev)

    stats = []  # per micro-batch of the first epoch: tokens, loss * weight, and kl, entropy * tokens
    clips = []  # per micro-batch of every epoch: tokens, clipped fraction * tokens (epoch 0 of mu = 1
    # or of the first pass never clips: its ratio is 1; the log is their token-weighted mean over all)
    for epoch in range(cfg.mu):
        for j, idx in enumerate(chunks):
            ids, pos, ctx, rows, resp_ids, mask = batch(idx)
            if j not in cache:
                cache[j] = _old_and_ref(model, ref_model, ids, pos, ctx, rows, resp_ids, mask, cfg)
            old, ref = cache[j]
            frac = _micro_weight(cfg.loss_type, len(idx), len(comps), mask, active)
            with autocast(model, cfg.precision):
                hidden = model(ids, pos, ctx)[rows.view(-1)]  # (B*T, H) rows predicting response tokens
                loss, m = grpo_loss(hidden=hidden, weight=W, ids=resp_ids, mask=mask, rewards=rewards[idx],
                                    group_size=cfg.group_size, old_logprobs=old, ref_logprobs=ref,
                                    temperature=cfg.temperature, config=loss_cfg,
                                    num_items_in_batch=max(active, 1) if cfg.loss_type == "dapo" else None,
                                    backend=cfg.backend)
                aux = moe_aux_loss(model)  # MoE policies: load balancing, read before the next forward
            # the MoE balance loss is this micro-batch's own mean: weighted by its share of the rows, for
            # every loss type (under dapo frac is 1, and K micro-batches counted it K times)
            (loss * frac + (aux * (len(idx) / len(comps)) if aux is not None else 0)).backward()
            n = m["num_tokens"].detach().float()  # kept on the device: read once after the loop
            clips.append(torch.stack([n, (m["clip_frac_low"] + m["clip_frac_high"]).float() * n]))
            if epoch == 0:
                stats.append(torch.stack([n, loss.detach().float() * frac, m["kl"].float() * n,
                                          m["entropy"].float() * n if "entropy" in m else torch.zeros_like(n)]))
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
        if not torch.isfinite(gnorm):  # never step on NaN/inf: the weights would be lost silently
            raise FloatingPointError(f"non-finite gradient norm ({float(gnorm)}), update skipped")
        opt.step()
        opt.zero_grad(set_to_none=True)
    total = torch.stack(stats).sum(0).tolist() if stats else [0.0] * 4
    sums = dict(zip(("tokens", "loss", "kl", "entropy"), total))
    c = torch.stack(clips).sum(0).tolist() if clips else [0.0, 0.0]
    sums["clip_frac"] = c[1] / max(c[0], 1.0)  # a fraction already (the others are sums over tokens)
    sums["grad_norm"] = float(gnorm)
    # sequence tokens (prompt + completion per sample, as TRL counts them), whatever share_prefix packs:
    # train_tok_s compares across settings and trainers; the forward itself runs on fewer with sharing
    sums["train_tokens"] = sum(lengths) * cfg.mu
    return sums


def _micro_weight(loss_type, rows, total_rows, mask, active):
    """Scale of a micro-batch's loss so that the micro-batches sum to the whole batch's loss."""
    if loss_type == "dapo":
        return 1.0  # num_items_in_batch already normalizes by the global token count
    if loss_type == "bnpo":
        return float(mask.sum()) / max(active, 1)
    return rows / total_rows  # "grpo", "dr_grpo": means over rows


@torch.no_grad()
def _old_and_ref(model, ref_model, ids, pos, ctx, rows, resp_ids, mask, cfg):
    """Old- and reference-policy log-probs (B, T) of the response tokens; 0 where masked (their
    logits are not computed: completions shorter than T)."""
    live = mask.reshape(-1) != 0

    def logp(m):
        with autocast(m, cfg.precision):  # the precision of the training forward
            h = m(ids, pos, ctx)[rows.view(-1)[live]]
            lp = linear_token_logprobs(h, m.lm_head_weight, resp_ids.reshape(-1)[live], cfg.temperature,
                                       backend=cfg.backend)
        return lp.new_zeros(resp_ids.numel()).masked_scatter_(live, lp).view(resp_ids.shape)

    old = logp(model) if cfg.mu > 1 else None  # on-policy (mu == 1): the op uses sg(logp), ratio 1
    ref = logp(ref_model) if ref_model is not None else None
    return old, ref


def run_grpo(cfg: GRPOConfig, model=None, tokenizer=None, exclude=(), tag: str = "grpo"):
    """Train; returns (model, tokenizer, summary). Ctrl-C saves a checkpoint, then re-raises."""
    if model is None:
        model, tokenizer = load_model_and_tokenizer(cfg.model, cfg.seed, cfg.device)
        if cfg.model in BUILTIN_MODELS and not cfg.resume:  # it trained nothing and said nothing
            print(f"[{tag}] WARNING: model {cfg.model!r} is the built-in config with random weights: its answers "
                  "score 0, so every group has zero reward variance" + (" and dynamic sampling drops it: nothing "
                  "trains" if cfg.dynamic_sampling else "") + ". Start from a trained model (reasonrl sft, then "
                  "--model runs/sft/final), or run `reasonrl train` (SFT, then GRPO).", file=sys.stderr, flush=True)
    dev = resolve_device(cfg.device)
    model = model.to(dev)
    keep_freed_memory(dev)
    if cfg.precision == "bf16":
        warn_if_slow_bf16(dev, "precision")
    if cfg.rollout_dtype == "bf16":
        warn_if_slow_bf16(dev, "rollout_dtype")
    tasks = make_tasks(cfg)
    no_acc = [t[0] for t in tasks if not any(name == "accuracy" for name, _, _ in t[2])]
    if cfg.dynamic_sampling and cfg.filter_on == "accuracy" and no_acc:
        print(f"[{tag}] note: filter_on='accuracy' but task(s) {no_acc} have no accuracy reward: their groups are "
              "kept or dropped by the variance of their total reward", flush=True)
    ref_model = copy_model(model).eval().requires_grad_(False) if cfg.beta > 0 else None
    loss_cfg = GRPOLossConfig(advantage=cfg.advantage, epsilon_low=cfg.epsilon_low, epsilon_high=cfg.epsilon_high,
                              beta=cfg.beta, loss_type=cfg.loss_type, max_completion_length=cfg.max_tokens)
    opt = make_optimizer(model, cfg)
    engine = LLMEngine(model, tokenizer=tokenizer, max_num_seqs=cfg.prompts_per_step * cfg.group_size,
                       dtype=torch.bfloat16 if cfg.rollout_dtype == "bf16" else None)
    step, elapsed, logger = resume_or_start(cfg, model, opt, tag)

    def save():
        state = {"step": step, "elapsed": elapsed, "config": dataclasses.asdict(cfg), "stage": tag}
        return save_checkpoint(cfg.out_dir, model, opt, state, tokenizer, keep=cfg.keep_checkpoints)

    exclude, start = set(exclude), time.perf_counter() - elapsed
    model.train()
    warn_if_warmup_outlasts(tag, cfg)
    bar = StageBar(tag, cfg.steps, cfg.max_seconds, step, elapsed)
    try:
        with StepGuard(tag, opt) as guard:
            while step < cfg.steps and not (cfg.max_seconds and elapsed >= cfg.max_seconds):
                progress = max(step / cfg.steps, elapsed / cfg.max_seconds if cfg.max_seconds else 0.0)
                lr = lr_at(step, progress, cfg.lr, cfg.warmup_steps, cfg.min_lr_ratio)
                for group in opt.param_groups:
                    group["lr"] = lr
                groups, rs = rollout(engine, tokenizer, tasks, cfg, step, exclude)
                t0 = time.perf_counter()
                ts = train_on_groups(model, ref_model, opt, groups, cfg, loss_cfg) if groups else None
                train_s = time.perf_counter() - t0
                step += 1
                elapsed = time.perf_counter() - start
                row = _row(step, lr, rs, ts, train_s, elapsed, len(groups))
                if cfg.tasks:
                    row.update(_task_metrics(rs, [t[0] for t in tasks]))
                line = logger.log(row, LOG_KEYS + tuple(k for k in row if "/" in k))
                bar.tick(step, elapsed)
                if step % cfg.log_every == 0:
                    bar.write(f"[{tag}] {line}")
                if cfg.save_every and step % cfg.save_every == 0:
                    save()
                guard.step_done()
                if guard.stop_requested:
                    raise KeyboardInterrupt
    except KeyboardInterrupt:
        bar.close()
        on_interrupt(tag, guard, save, cfg.out_dir, step)
        raise
    except FloatingPointError as e:
        bar.close()
        raise on_nonfinite(tag, guard, save, cfg.out_dir, step, e) from None
    bar.close()
    with hold_signals(tag):  # an interrupt now waits for both (it lost the whole stage before)
        save()
        save_model(model, os.path.join(cfg.out_dir, "final"), tokenizer=tokenizer)
    plot_metrics(logger.path, os.path.join(cfg.out_dir, "metrics.png"),
                 ["reward", "accuracy", "format", "length", "kl", "clip_frac", "entropy", "groups", "lr"])
    return model, tokenizer, {"steps": step, "seconds": elapsed}


def _task_metrics(rs, names):
    """reward/<task>, accuracy/<task> (tasks with an accuracy reward), groups/<task> (prompts drawn)."""
    out = {}
    for name in names:
        gs = [g for g in rs["all"] if g["task"] == name]
        out[f"groups/{name}"] = len(gs)
        if gs:
            rewards = [r for g in gs for r in g["rewards"]]
            out[f"reward/{name}"] = sum(rewards) / len(rewards)
            acc = [a for g in gs for a in g["parts"].get("accuracy", [])]
            if acc:
                out[f"accuracy/{name}"] = sum(acc) / len(acc)
    return out


def _row(step, lr, rs, ts, train_s, elapsed, kept):
    """One log line: reward stats over every sampled completion, loss stats over the kept batch."""
    all_rewards = [r for g in rs["all"] for r in g["rewards"]]
    acc = [a for g in rs["all"] for a in g["parts"].get("accuracy", [])]
    fmt = [format_reward(t) for g in rs["all"] for t in g["texts"]]
    lens = [c.length for g in rs["all"] for c in g["completions"]]
    n = max(ts["tokens"], 1) if ts else 1
    nan = float("nan")
    return {"step": step, "lr": lr, "reward": sum(all_rewards) / len(all_rewards),
            "accuracy": sum(acc) / len(acc) if acc else float("nan"), "format": sum(fmt) / len(fmt),
            "length": sum(lens) / len(lens), "groups": kept,
            "truncated": sum(c.finish_reason == "length" for g in rs["all"] for c in g["completions"]) / len(lens),
            # no kept group, no update: NaN (a gap in the plots), not a 0 that reads as a measured value
            "loss": ts["loss"] if ts else nan, "kl": ts["kl"] / n if ts else nan,
            "clip_frac": ts["clip_frac"] if ts else nan, "entropy": ts["entropy"] / n if ts else nan,
            "grad_norm": ts["grad_norm"] if ts else nan,
            "rollout_tok_s": rs["rollout_tokens"] / max(rs["rollout_s"], 1e-9),
            "train_tok_s": ts["train_tokens"] / max(train_s, 1e-9) if ts else 0.0, "elapsed": elapsed}
