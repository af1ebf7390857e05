"""Supervised fine-tuning on worked examples: loss = mean over response tokens of -log p(token),
from the fused LM-head op on packed sequences (no N x V logits, except a batch's that fit
SFTConfig.keep_logits_mib: kept from forward to backward instead of recomputed)."""
from __future__ import annotations

import dataclasses
import os
import time

import torch

from reasonrl.ops import linear_token_logprobs
from reasonrl.rl.tasks import get_task, parse_task_mix
from reasonrl.train.checkpoint import (StepGuard, hold_signals, on_interrupt, on_nonfinite, resume_or_start,
                                       save_checkpoint)
from reasonrl.train.common import (autocast, encode_prompt, encode_response, keep_freed_memory, load_model_and_tokenizer,
                                   lr_at, make_optimizer, moe_aux_loss, pack_sft, resolve_device, step_seed,
                                   StageBar, warn_if_slow_bf16, warn_if_warmup_outlasts)
from reasonrl.train.config import SFTConfig
from reasonrl.train.logger import plot_metrics
from reasonrl.models import save_model


def sft_examples(cfg: SFTConfig):
    """The fixed cold-start set: num_examples training-split problems with worked solutions (a task
    mix "multiply=0.7;add=0.3" splits num_examples by weight, largest remainders first)."""
    if "=" in cfg.task:
        mix = parse_task_mix(cfg.task)
        total = sum(w for _, w, _ in mix)
        exact = [cfg.num_examples * w / total for _, w, _ in mix]
        counts = [int(x) for x in exact]
        for i in sorted(range(len(mix)), key=lambda i: counts[i] - exact[i])[:cfg.num_examples - sum(counts)]:
            counts[i] += 1
        problems = [p for (name, _, _), k in zip(mix, counts)
                    for p in get_task(name, cfg.difficulty).problems(k, seed=cfg.seed, split="train")]
    else:
        problems = get_task(cfg.task, cfg.difficulty).problems(cfg.num_examples, seed=cfg.seed, split="train")
    missing = [p.question for p in problems if not p.solution]
    if missing:
        raise ValueError(f"SFTConfig.task {cfg.task!r}: {len(missing)} problems have no worked solution "
                         f"(e.g. {missing[0]!r}); SFT needs one per example")
    return problems


def run_sft(cfg: SFTConfig, model=None, tokenizer=None, examples=None, tag: str = "sft"):
    """Train; returns (model, tokenizer, summary dict). Ctrl-C saves a checkpoint, then re-raises."""
    dev = resolve_device(cfg.device)
    if model is None:
        model, tokenizer = load_model_and_tokenizer(cfg.model, cfg.seed, cfg.device)
    model = model.to(dev)
    keep_freed_memory(dev)
    if cfg.precision == "bf16":
        warn_if_slow_bf16(dev, "precision")
    examples = examples if examples is not None else sft_examples(cfg)
    data = [(encode_prompt(tokenizer, cfg.prompt_template, p.question), encode_response(tokenizer, p.solution))
            for p in examples]
    model.train()
    opt = make_optimizer(model, cfg)
    step, elapsed, logger = resume_or_start(cfg, model, opt, tag)

    def save():
        state = {"step": step, "elapsed": elapsed, "config": dataclasses.asdict(cfg), "stage": tag}
        return save_checkpoint(cfg.out_dir, model, opt, state, tokenizer, keep=cfg.keep_checkpoints)

    start = time.perf_counter() - elapsed
    warn_if_warmup_outlasts(tag, cfg)
    bar = StageBar(tag, cfg.steps, cfg.max_seconds, step, elapsed)
    try:
        with StepGuard(tag, opt) as guard:
            while step < cfg.steps and not (cfg.max_seconds and elapsed >= cfg.max_seconds):
                t0 = time.perf_counter()
                g = torch.Generator().manual_seed(step_seed(cfg.seed, tag, step))
                idx = torch.randint(len(data), (cfg.batch_size,), generator=g).tolist()
                progress = max(step / cfg.steps, elapsed / cfg.max_seconds if cfg.max_seconds else 0.0)
                lr = lr_at(step, progress, cfg.lr, cfg.warmup_steps, cfg.min_lr_ratio)
                for group in opt.param_groups:
                    group["lr"] = lr
                ids, pos, ctx, rows, targets = pack_sft([data[i][0] for i in idx], [data[i][1] for i in idx],
                                                        device=dev)
                with autocast(model, cfg.precision):
                    hidden = model(ids, pos, ctx)[rows]  # (n, H): the rows that predict response tokens
                    logp = linear_token_logprobs(hidden, model.lm_head_weight, targets,
                                                 keep_logits=_logits_fit(hidden, model.lm_head_weight, cfg))
                    loss = -logp.sum() / logp.numel()
                    aux = moe_aux_loss(model)  # MoE policies: load balancing
                (loss + aux if aux is not None else loss).backward()
                gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
                if not torch.isfinite(gnorm):  # never step on NaN/inf: the weights would be lost silently
                    raise FloatingPointError(f"non-finite gradient norm ({float(gnorm)}), update skipped")
                opt.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                elapsed = time.perf_counter() - start
                bar.tick(step, elapsed)
                last = step == cfg.steps or (cfg.max_seconds and elapsed >= cfg.max_seconds)
                if step % cfg.log_every == 0 or last:
                    loss_v = loss.item()  # waits for the GPU (the optimizer step too) before the clock is read
                    dt = time.perf_counter() - t0
                    line = logger.log({"step": step, "loss": loss_v, "lr": lr, "grad_norm": gnorm.item(),
                                       "tokens": logp.numel(), "train_tok_s": ids.numel() / dt, "elapsed": elapsed})
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
    plot_metrics(logger.path, os.path.join(cfg.out_dir, "metrics.png"))
    return model, tokenizer, {"steps": step, "seconds": elapsed}


def _logits_fit(hidden, weight, cfg) -> bool:
    """Whether this micro-batch's logits (rows x V, in the dtype the LM head computes in) fit
    cfg.keep_logits_mib: then linear_token_logprobs keeps them for backward (6NHV FLOPs, not 8NHV).
    NOTE: CPU, 2 threads, fp32, N=1024 H=128 V=32000 (2026-11-28): fwd+bwd 485 -> 311 ms for 125 MiB kept."""
    dev = hidden.device.type
    dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else hidden.dtype
    elt = torch.finfo(dt).bits // 8
    return hidden.shape[0] * weight.shape[0] * elt <= cfg.keep_logits_mib << 20
