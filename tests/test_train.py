"""The trainer: schedule, packing, checkpoints, configs, SFT and a few-step end-to-end GRPO on CPU,
resume equivalence (interrupted by Ctrl-C, resumed, same metrics as an uninterrupted run)."""
import dataclasses
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import time

import pytest
import torch

import reasonrl.train.grpo as grpo_mod
import reasonrl.train.sft as sft_mod
from reasonrl.models import ModelConfig, init_model, load_model, load_tokenizer, builtin_path
from reasonrl.ops import linear_token_logprobs
from reasonrl.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from reasonrl.train.common import lr_at, make_optimizer, pack, token_budget_batches
from reasonrl.train.config import GRPOConfig, SFTConfig, TrainConfig, parse_config
from reasonrl.train.grpo import run_grpo
from reasonrl.train.logger import MetricsLogger
from reasonrl.train.pipeline import run_train
from reasonrl.train.sft import run_sft


def micro_model(seed=0):
    """The tiny tokenizer with a much smaller decoder, so that CPU tests take seconds."""
    cfg = ModelConfig.from_json(builtin_path("tiny"))
    cfg = dataclasses.replace(cfg, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=2, num_key_value_heads=2, head_dim=16)
    return init_model(cfg, seed=seed), load_tokenizer(builtin_path("tiny"))


def test_lr_schedule():
    assert lr_at(0, 0.0, 1.0, 10, 0.1) == pytest.approx(0.1)
    assert lr_at(9, 0.0, 1.0, 10, 0.1) == pytest.approx(1.0)
    assert lr_at(10, 0.0, 1.0, 10, 0.1) == pytest.approx(1.0)
    assert lr_at(50, 0.5, 1.0, 10, 0.1) == pytest.approx(0.55)
    assert lr_at(99, 1.0, 1.0, 10, 0.1) == pytest.approx(0.1)
    assert lr_at(99, 2.0, 1.0, 10, 0.0) == pytest.approx(0.0)


def test_pack_targets_align():
    prompts, responses = [[1, 5, 6], [1, 7]], [[8, 9, 2], [3, 2]]
    ids, pos, ctx, targets, rows = pack(prompts, responses)
    assert ids.tolist() == [1, 5, 6, 8, 9, 2, 1, 7, 3, 2]
    assert pos.tolist() == [0, 1, 2, 3, 4, 5, 0, 1, 2, 3]
    assert ctx.cu_seqlens.tolist() == [0, 6, 10] and ctx.max_seqlen == 6
    assert targets.tolist() == [-100, -100, 8, 9, 2, -100, -100, 3, 2, -100]
    assert rows.tolist() == [[2, 3, 4], [7, 8, 0]]
    assert [targets[r].tolist() for r in rows[0]] == [8, 9, 2]


def test_token_budget_batches():
    assert token_budget_batches([5, 5, 5, 5], 10) == [[0, 1], [2, 3]]
    assert token_budget_batches([5, 5, 5, 5], 10, unit=2) == [[0, 1], [2, 3]]
    assert token_budget_batches([5, 5, 5, 5], 9, unit=2) == [[0, 1], [2, 3]]  # oversized unit alone
    assert token_budget_batches([1] * 6, 100, unit=3) == [[0, 1, 2, 3, 4, 5]]


def test_sft_loss_matches_reference_and_learns():
    """The SFT loss is the mean over response tokens of -log p, as a float64 reference computes it."""
    model, tok = micro_model()
    ids, pos, ctx, targets, _ = pack([[1, 11, 12], [1, 13]], [[4, 20, 2], [5, 2]])
    hidden = model(ids, pos, ctx)
    logp = linear_token_logprobs(hidden, model.lm_head_weight, targets)
    logits = (hidden.double() @ model.lm_head_weight.double().T).log_softmax(-1)
    keep = targets != -100
    ref = logits[keep].gather(1, targets[keep][:, None]).squeeze(1)
    torch.testing.assert_close(logp[keep].double(), ref, rtol=1e-4, atol=1e-5)
    assert (logp[~keep] == 0).all()


def _sft_cfg(tmp_path, **kw):
    base = dict(num_examples=32, steps=8, batch_size=8, lr=3e-3, warmup_steps=2, log_every=1,
                out_dir=str(tmp_path / "sft"), seed=3, device="cpu")  # CPU tests also where a GPU is seen
    return SFTConfig(**{**base, **kw})


def test_sft_runs_and_saves(tmp_path):
    model, tok = micro_model()
    cfg = _sft_cfg(tmp_path, steps=25)
    model, tok, summary = run_sft(cfg, model=model, tokenizer=tok)
    rows = [json.loads(line) for line in open(tmp_path / "sft" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == list(range(1, 26))
    assert sum(r["loss"] for r in rows[-5:]) < sum(r["loss"] for r in rows[:5])  # it learns
    assert os.path.isfile(tmp_path / "sft" / "metrics.png")
    reloaded = load_model(str(tmp_path / "sft" / "final"))
    for (n, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("mib,want", [(256, True), (0, False)])
def test_sft_keeps_logits_that_fit(tmp_path, monkeypatch, mib, want):
    """SFTConfig.keep_logits_mib: a batch's logits that fit are kept for backward (linear_token_logprobs
    keep_logits), else recomputed; the same losses either way; a negative budget is a clear error."""
    import reasonrl.train.sft as sft
    seen, real = [], sft.linear_token_logprobs
    monkeypatch.setattr(sft, "linear_token_logprobs", lambda *a, **k: (seen.append(k["keep_logits"]), real(*a, **k))[1])
    model, tok = micro_model()
    run_sft(_sft_cfg(tmp_path, steps=3, keep_logits_mib=mib), model=model, tokenizer=tok)
    assert seen == [want] * 3
    losses = [json.loads(line)["loss"] for line in open(tmp_path / "sft" / "metrics.jsonl")]
    model, tok = micro_model()
    run_sft(_sft_cfg(tmp_path / "b", steps=3, keep_logits_mib=256 - mib), model=model, tokenizer=tok)
    other = [json.loads(line)["loss"] for line in open(tmp_path / "b" / "sft" / "metrics.jsonl")]
    assert other == pytest.approx(losses, rel=1e-5)
    with pytest.raises(ValueError, match="keep_logits_mib"):
        _sft_cfg(tmp_path, keep_logits_mib=-1)


def _interrupt_after(monkeypatch, module, name, calls):
    real, count = getattr(module, name), [0]

    def wrapper(*a, **k):
        count[0] += 1
        if count[0] > calls:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(module, name, wrapper)


def test_sft_resume_matches_uninterrupted(tmp_path, monkeypatch):
    cfg_a = _sft_cfg(tmp_path, out_dir=str(tmp_path / "a"))
    run_sft(cfg_a, *micro_model()[:2])
    cfg_b = _sft_cfg(tmp_path, out_dir=str(tmp_path / "b"))
    with monkeypatch.context() as m:
        _interrupt_after(m, sft_mod, "linear_token_logprobs", 5)
        with pytest.raises(KeyboardInterrupt):
            run_sft(cfg_b, *micro_model()[:2])
    ckpt = latest_checkpoint(str(tmp_path / "b"))
    assert ckpt is not None and ckpt.endswith("step-0000005")  # Ctrl-C saved before exit
    run_sft(dataclasses.replace(cfg_b, resume=True), *micro_model(seed=99)[:2])  # other init: overwritten
    a = [json.loads(x) for x in open(tmp_path / "a" / "metrics.jsonl")]
    b = [json.loads(x) for x in open(tmp_path / "b" / "metrics.jsonl")]
    assert [r["step"] for r in b] == list(range(1, 9))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    ma, mb = load_model(str(tmp_path / "a" / "final")), load_model(str(tmp_path / "b" / "final"))
    assert all(torch.equal(x, y) for x, y in zip(ma.parameters(), mb.parameters()))


def test_checkpoint_round_trip_and_atomic(tmp_path):
    model, tok = micro_model()
    opt = make_optimizer(model, SFTConfig())
    model(torch.tensor([1, 2, 3]), torch.arange(3), pack([[1]], [[2, 3]])[2]).sum().backward()
    opt.step()
    torch.manual_seed(1234)
    path = save_checkpoint(str(tmp_path), model, opt, {"step": 7, "note": "x"}, tok)
    expect_next = torch.rand(3)
    save_checkpoint(str(tmp_path), model, opt, {"step": 8}, tok)
    save_checkpoint(str(tmp_path), model, opt, {"step": 9}, tok)
    names = sorted(os.listdir(tmp_path))
    assert names == ["latest", "step-0000008", "step-0000009"]  # keep=2, no temporaries left
    assert latest_checkpoint(str(tmp_path)).endswith("step-0000009")
    assert not os.path.exists(path)  # step 7 rotated out
    m2, _ = micro_model(seed=5)
    o2 = make_optimizer(m2, SFTConfig())
    state = load_checkpoint(str(tmp_path / "step-0000009"), m2, o2)
    assert state["step"] == 9
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), m2.parameters()))
    s1, s2 = opt.state_dict()["state"], o2.state_dict()["state"]
    assert all(torch.equal(s1[k]["exp_avg_sq"], s2[k]["exp_avg_sq"]) for k in s1)
    torch.manual_seed(1234)
    save_checkpoint(str(tmp_path / "r"), model, opt, {"step": 1})
    torch.rand(5)
    load_checkpoint(latest_checkpoint(str(tmp_path / "r")), model)
    assert torch.equal(torch.rand(3), expect_next)  # RNG state restored
    with open(tmp_path / "latest", "w") as f:  # `latest` names a folder a crash left missing:
        f.write("step-0000123")
    assert latest_checkpoint(str(tmp_path)).endswith("step-0000009")  # the newest complete one
    for d in ("step-0000008", "step-0000009"):
        shutil.rmtree(tmp_path / d)
    with pytest.raises(FileNotFoundError, match="incomplete or missing"):
        latest_checkpoint(str(tmp_path))


def test_latest_pointer_missing_falls_back_to_the_newest_checkpoint(tmp_path, capsys):
    """A crash between the first checkpoint's rename and the pointer's write left no `latest`: --resume
    said "no checkpoint", moved the complete step-* folder aside and trained from step 0."""
    model, tok = micro_model()
    opt = make_optimizer(model, SFTConfig())
    for step in (3, 4):
        save_checkpoint(str(tmp_path), model, opt, {"step": step}, tok)
    os.remove(tmp_path / "latest")
    assert latest_checkpoint(str(tmp_path)).endswith("step-0000004")
    assert "no 'latest' pointer" in capsys.readouterr().out
    shutil.rmtree(tmp_path / "step-0000004")
    os.mkdir(tmp_path / "step-0000005")  # no state.json: not a complete checkpoint
    assert latest_checkpoint(str(tmp_path)).endswith("step-0000003")
    assert latest_checkpoint(str(tmp_path / "missing")) is None and latest_checkpoint(str(tmp_path / "step-0000005")) is None


def test_checkpoint_same_step_not_rewritten_and_stale_temporaries_removed(tmp_path):
    """Saving a step that is already complete keeps that folder (a rewrite used to delete it first,
    so a crash in between left `latest` naming nothing); temporaries of dead writers are removed."""
    model, tok = micro_model()
    opt = make_optimizer(model, SFTConfig())
    path = save_checkpoint(str(tmp_path), model, opt, {"step": 4}, tok)
    inode = os.stat(path).st_ino
    stale = tmp_path / ".tmp-step-0000005-999999999"  # no such process
    stale.mkdir()
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    assert save_checkpoint(str(tmp_path), model, opt, {"step": 4}, tok) == path
    assert os.stat(path).st_ino == inode and not stale.exists()
    assert sorted(os.listdir(tmp_path)) == ["latest", "step-0000004"]


@pytest.mark.parametrize("where", ["after_update", "in_metrics_write"])
def test_interrupt_after_the_optimizer_step_does_not_save_that_step(tmp_path, monkeypatch, where):
    """A KeyboardInterrupt between a step's optimizer update and the end of the step (here: in its
    metrics write) must not save: the checkpoint would hold step 6's weights labelled step 5, and
    --resume would train step 6 twice. The last periodic checkpoint stays; resume equals an
    uninterrupted run."""
    cfg_a = _sft_cfg(tmp_path, out_dir=str(tmp_path / "a"), save_every=2)
    run_sft(cfg_a, *micro_model()[:2])
    cfg_b = _sft_cfg(tmp_path, out_dir=str(tmp_path / "b"), save_every=2)
    calls = [0]

    def fifth(*a, **k):
        calls[0] += 1
        if calls[0] == 5:
            raise KeyboardInterrupt
    with monkeypatch.context() as m:
        if where == "after_update":  # right after step 5's optimizer update
            from torch.optim.optimizer import register_optimizer_step_post_hook
            handle = register_optimizer_step_post_hook(fifth)
        else:
            real = MetricsLogger.log
            m.setattr(MetricsLogger, "log", lambda self, *a, **k: fifth() or real(self, *a, **k))
        try:
            with pytest.raises(KeyboardInterrupt):
                run_sft(cfg_b, *micro_model()[:2])
        finally:
            if where == "after_update":
                handle.remove()
    assert latest_checkpoint(str(tmp_path / "b")).endswith("step-0000004")
    run_sft(dataclasses.replace(cfg_b, resume=True), *micro_model(seed=99)[:2])
    a = [json.loads(x) for x in open(tmp_path / "a" / "metrics.jsonl")]
    b = [json.loads(x) for x in open(tmp_path / "b" / "metrics.jsonl")]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    ma, mb = load_model(str(tmp_path / "a" / "final")), load_model(str(tmp_path / "b" / "final"))
    assert all(torch.equal(x, y) for x, y in zip(ma.parameters(), mb.parameters()))


def test_torn_metrics_line_is_dropped_on_resume(tmp_path):
    from reasonrl.train.logger import MetricsLogger as ML

    log = ML(str(tmp_path))
    for i in (1, 2, 3):
        log.log({"step": i, "loss": 0.5})
    with open(log.path, "a") as f:
        f.write('{"step": 4, "lo')  # a crash mid-write
    ML(str(tmp_path), resume_step=2)
    assert [json.loads(x)["step"] for x in open(log.path)] == [1, 2]
    with open(log.path, "a") as f:
        f.write('garbage\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:3: not a JSON line"):
        ML(str(tmp_path), resume_step=3)


def test_out_dir_that_is_a_file_is_a_clear_error(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OSError, match="out_dir .*afile.* cannot be created"):
        from reasonrl.train.logger import MetricsLogger as ML
        ML(str(tmp_path / "afile"))


def _grpo_cfg(tmp_path, **kw):
    base = dict(steps=3, prompts_per_step=2, group_size=4, max_tokens=12, lr=1e-3, warmup_steps=1,
                micro_batch_tokens=80, out_dir=str(tmp_path / "grpo"), seed=1, max_refills=1, filter_on="reward",
                rewards="accuracy:1.0,format:0.1,test_train:length_reward:0.01", device="cpu")
    return GRPOConfig(**{**base, **kw})


def length_reward(response, problem):
    return float(len(response))  # gives every group reward variance, so every step trains


def test_grpo_end_to_end(tmp_path):
    model, tok = micro_model()
    before = [p.detach().clone() for p in model.parameters()]
    cfg = _grpo_cfg(tmp_path, mu=2, beta=0.05, truncation="keep")
    model, _, summary = run_grpo(cfg, model=model, tokenizer=tok)
    rows = [json.loads(x) for x in open(tmp_path / "grpo" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3] and summary["steps"] == 3
    for key in ("reward", "accuracy", "format", "length", "kl", "clip_frac", "entropy", "rollout_tok_s",
                "train_tok_s", "groups", "truncated"):
        assert all(math.isfinite(r[key]) for r in rows), key
    assert all(r["groups"] == 2 for r in rows) and all(r["entropy"] > 0 for r in rows)
    assert any(r["kl"] > 0 for r in rows[1:])  # the policy moved away from the frozen reference
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert os.path.isfile(tmp_path / "grpo" / "metrics.png")
    assert latest_checkpoint(str(tmp_path / "grpo")).endswith("step-0000003")


def test_grpo_resume_matches_uninterrupted(tmp_path, monkeypatch):
    cfg_a = _grpo_cfg(tmp_path, out_dir=str(tmp_path / "a"))
    run_grpo(cfg_a, *micro_model()[:2])
    cfg_b = _grpo_cfg(tmp_path, out_dir=str(tmp_path / "b"))
    with monkeypatch.context() as m:
        _interrupt_after(m, grpo_mod, "train_on_groups", 2)
        with pytest.raises(KeyboardInterrupt):
            run_grpo(cfg_b, *micro_model()[:2])
    assert latest_checkpoint(str(tmp_path / "b")).endswith("step-0000002")
    run_grpo(dataclasses.replace(cfg_b, resume=True), *micro_model(seed=7)[:2])
    a = [json.loads(x) for x in open(tmp_path / "a" / "metrics.jsonl")]
    b = [json.loads(x) for x in open(tmp_path / "b" / "metrics.jsonl")]
    drop = ("rollout_tok_s", "train_tok_s", "elapsed")
    assert [{k: v for k, v in r.items() if k not in drop} for r in a] == \
           [{k: v for k, v in r.items() if k not in drop} for r in b]


def test_dynamic_sampling_drops_zero_variance_groups(tmp_path):
    model, tok = micro_model()
    cfg = _grpo_cfg(tmp_path, steps=1, rewards="accuracy", max_refills=1)  # untrained: all rewards 0
    run_grpo(cfg, model=model, tokenizer=tok)
    row = json.loads(open(tmp_path / "grpo" / "metrics.jsonl").readline())
    # no update: loss, kl, clip_frac, entropy and grad_norm are NaN (JSON null), not a measured-looking 0
    assert row["groups"] == 0 and all(row[k] is None for k in ("loss", "kl", "clip_frac", "entropy", "grad_norm"))
    # the accuracy filter (the default) drops groups whose only variance is in other rewards
    spec = "accuracy:1.0,test_train:length_reward:0.01"
    run_grpo(_grpo_cfg(tmp_path, steps=1, rewards=spec, filter_on="accuracy", out_dir=str(tmp_path / "acc")),
             model=model, tokenizer=tok)
    assert json.loads(open(tmp_path / "acc" / "metrics.jsonl").readline())["groups"] == 0
    run_grpo(_grpo_cfg(tmp_path, steps=1, rewards=spec, filter_on="reward", out_dir=str(tmp_path / "rew")),
             model=model, tokenizer=tok)
    assert json.loads(open(tmp_path / "rew" / "metrics.jsonl").readline())["groups"] == 2
    # every completion truncated at 2 tokens and penalized: equal rewards again, nothing kept
    cfg = _grpo_cfg(tmp_path, steps=1, max_tokens=2, truncation="penalize", truncation_reward=-1.0,
                    out_dir=str(tmp_path / "pen"))
    run_grpo(cfg, model=model, tokenizer=tok)
    row = json.loads(open(tmp_path / "pen" / "metrics.jsonl").readline())
    assert row["truncated"] == 1.0 and row["groups"] == 0 and row["reward"] == -1.0


def test_pipeline_few_steps(tmp_path, capsys):
    cfg = TrainConfig(sft=_sft_cfg(tmp_path, steps=4, model="tiny", log_every=100), grpo=_grpo_cfg(tmp_path, steps=1),
                      eval_problems=8, out_dir=str(tmp_path / "run"))
    res = run_train(cfg)
    assert set(res) >= {"sft", "grpo", "control"}
    for k in ("sft", "grpo", "control"):
        assert 0 <= res[k]["accuracy"] <= 1 and res[k]["n"] == 8
    assert res["control"]["steps"] >= 1
    out = capsys.readouterr().out
    assert "held-out accuracy" in out and "SFT control" in out
    assert os.path.isfile(tmp_path / "run" / "results.json")


def test_pipeline_resume_continues_an_interrupted_run(tmp_path, monkeypatch, capsys):
    """`reasonrl train --resume`: a run interrupted in GRPO continues it; SFT (finished) is loaded, not
    rerun; the SFT and GRPO metrics equal an uninterrupted run's."""
    def cfg(name, **kw):
        return TrainConfig(sft=_sft_cfg(tmp_path, steps=4, model="tiny", log_every=1),
                           grpo=_grpo_cfg(tmp_path, steps=3), eval_problems=4, control=False,
                           out_dir=str(tmp_path / name), **kw)
    run_train(cfg("a"))
    with monkeypatch.context() as m:
        _interrupt_after(m, grpo_mod, "train_on_groups", 2)
        with pytest.raises(KeyboardInterrupt):
            run_train(cfg("b"))
    capsys.readouterr()
    run_train(cfg("b", resume=True))
    out = capsys.readouterr().out
    assert "[sft] resumed from" in out and "at step 4" in out and "[grpo] resumed from" in out
    drop = ("rollout_tok_s", "train_tok_s", "elapsed")
    for stage in ("sft", "grpo"):
        a, b = ([{k: v for k, v in json.loads(x).items() if k not in drop}
                 for x in open(tmp_path / r / stage / "metrics.jsonl")] for r in ("a", "b"))
        assert a == b, stage


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ValueError, match=r"GRPOConfig\.group_size"):
        GRPOConfig(group_size=1)
    with pytest.raises(ValueError, match=r"GRPOConfig\.filter_on"):
        GRPOConfig(filter_on="format")
    with pytest.raises(ValueError, match=r"GRPOConfig\.truncation"):
        GRPOConfig(truncation="drop")
    with pytest.raises(ValueError, match=r"SFTConfig\.lr"):
        SFTConfig(lr=0)
    with pytest.raises(ValueError, match=r"GRPOConfig\.loss_type"):
        GRPOConfig(loss_type="nope")
    with pytest.raises(ValueError, match=r"no_such_module"):
        GRPOConfig(rewards="no_such_module:f")
    with pytest.raises(ValueError, match=r"SFTConfig\.prompt_template"):
        SFTConfig(prompt_template="no placeholder")


def test_config_from_flags_and_toml(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('control_lr = 0.0003\n[grpo]\nlr = 5e-5\ngroup_size = 4\n[sft]\nsteps = 10\n')
    cfg = parse_config(TrainConfig, ["--config", str(toml), "--grpo.lr", "1e-4", "--batch_size", "8",
                                     "--sft.resume", "--grpo.difficulty", "none"])
    assert cfg.grpo.lr == 1e-4 and cfg.grpo.group_size == 4 and cfg.sft.steps == 10
    assert cfg.sft.batch_size == 8 and cfg.sft.resume is True and cfg.control_lr == 3e-4
    assert cfg.grpo.max_seconds == TrainConfig().grpo.max_seconds  # untouched nested defaults kept
    toml.write_text("[grpo]\nlearning_rate = 1\n")
    with pytest.raises(ValueError, match="unknown field 'learning_rate'"):
        parse_config(TrainConfig, ["--config", str(toml)])
    with pytest.raises(SystemExit):
        parse_config(TrainConfig, ["--lr", "1"])  # ambiguous: sft.lr or grpo.lr
    with pytest.raises(ValueError, match="--steps: expected int"):
        parse_config(SFTConfig, ["--steps", "many"])


def count_sevens(response, problem):
    return float(response.count("7"))


def test_grpo_learns_a_simple_reward(tmp_path, _seed_fresh):
    """The whole loop (rollout -> rewards -> grpo_loss -> AdamW) raises a reward it is given."""
    model, tok = micro_model(seed=_seed_fresh % 1000)
    cfg = GRPOConfig(steps=12, prompts_per_step=4, group_size=8, max_tokens=8, lr=1e-2, warmup_steps=1,
                     min_lr_ratio=1.0, rewards="test_train:count_sevens", truncation="keep",
                     out_dir=str(tmp_path / "g"), seed=_seed_fresh, log_every=100)
    run_grpo(cfg, model=model, tokenizer=tok)
    r = [json.loads(x)["reward"] for x in open(tmp_path / "g" / "metrics.jsonl")]
    assert sum(r[-3:]) / 3 > sum(r[:3]) / 3 + 0.2, r


def micro_moe_model(coef, seed=0):
    tiny = ModelConfig.from_json(builtin_path("tiny"))
    cfg = ModelConfig(arch="qwen3_moe", vocab_size=tiny.vocab_size, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, head_dim=16,
                      num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, router_aux_loss_coef=coef,
                      tie_word_embeddings=True, bos_token_id=tiny.bos_token_id, eos_token_id=tiny.eos_token_id)
    return init_model(cfg, seed=seed), load_tokenizer(builtin_path("tiny"))


def test_moe_policy_trains_with_the_load_balancing_loss(tmp_path, monkeypatch):
    """SFT and GRPO add router_aux_loss_coef x aux_loss for MoE policies: with a coefficient the
    router weights move differently than without, and the loss is read on every micro-batch."""
    import reasonrl.train.common as common
    calls = []

    def spy(model):
        out = common.moe_aux_loss(model)
        calls.append(out is not None and bool(torch.isfinite(out)) and float(out) > 0)
        return out

    monkeypatch.setattr(sft_mod, "moe_aux_loss", spy)
    monkeypatch.setattr(grpo_mod, "moe_aux_loss", spy)
    routers = {}
    for coef in (0.0, 0.5):
        model, tok = micro_moe_model(coef)
        calls.clear()
        model, tok, _ = run_sft(_sft_cfg(tmp_path / str(coef), steps=2), model=model, tokenizer=tok)
        assert calls == [coef > 0] * 2 if coef > 0 else calls == [False] * 2
        routers[coef] = model.model.layers[0].mlp.gate.weight.detach().clone()
        calls.clear()
        run_grpo(_grpo_cfg(tmp_path / str(coef), steps=1), model=model, tokenizer=tok)
        assert calls and all(calls) == (coef > 0)
    assert not torch.allclose(routers[0.0], routers[0.5])


def test_shipped_smollm2_config_parses():
    import reasonrl.train
    path = os.path.join(os.path.dirname(reasonrl.train.__file__), "smollm2_grpo.toml")
    cfg = parse_config(GRPOConfig, ["--config", path, "--steps", "2"])
    assert cfg.model == "smol" and cfg.steps == 2 and cfg.task == "add"
    assert "<answer>" in cfg.prompt_template and cfg.prompt_template.endswith("assistant\n")


@pytest.mark.parametrize("keep,expect", [(0, [2, 4, 6]), (2, [4, 6]), (1, [6])])
def test_keep_checkpoints(tmp_path, keep, expect):
    model, tok = micro_model()
    run_sft(_sft_cfg(tmp_path, steps=6, save_every=2, keep_checkpoints=keep), model=model, tokenizer=tok)
    steps = sorted(int(d.split("-")[1]) for d in os.listdir(tmp_path / "sft") if d.startswith("step-"))
    assert steps == expect
    assert latest_checkpoint(str(tmp_path / "sft")).endswith("step-0000006")
    with pytest.raises(ValueError, match="keep_checkpoints"):
        _sft_cfg(tmp_path, keep_checkpoints=-1)


def test_device_field_and_errors():
    from reasonrl.train.common import resolve_device
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="GRPOConfig.device"):
        GRPOConfig(device="tpu")
    with pytest.raises(ValueError, match="SFTConfig.device"):
        SFTConfig(device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device("cuda")


@pytest.mark.gpu
def test_sft_and_grpo_train_on_cuda(tmp_path):
    """The trainers move the model and every batch to the GPU (device auto), train under bf16 autocast
    (precision auto) with float32 master weights, and save checkpoints that load back on the CPU."""
    model, tok = micro_model()
    sft_cfg = SFTConfig(steps=3, batch_size=8, num_examples=16, out_dir=str(tmp_path / "sft"), log_every=1)
    model, tok, _ = run_sft(sft_cfg, model=model, tokenizer=tok)
    assert next(model.parameters()).is_cuda and next(model.parameters()).dtype == torch.float32
    before = [p.detach().clone() for p in model.parameters()]
    model, _, summary = run_grpo(_grpo_cfg(tmp_path, mu=2, beta=0.05, truncation="keep", device="auto"), model=model,
                                 tokenizer=tok)
    assert summary["steps"] == 3 and next(model.parameters()).is_cuda
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    rows = [json.loads(x) for x in open(tmp_path / "grpo" / "metrics.jsonl")]
    assert all(math.isfinite(r["reward"]) and math.isfinite(r["kl"]) for r in rows)
    back = load_model(str(tmp_path / "grpo" / "final"))
    assert all(torch.equal(a.cpu(), b) for a, b in zip(model.state_dict().values(), back.state_dict().values()))


# ------------------------------------------------------------------- bad input: clear errors, early
from reasonrl.train.checkpoint import resume_or_start  # noqa: E402
from reasonrl.train.config import DistillConfig, GenerateConfig, SampleConfig  # noqa: E402

_FLOAT_CONFIGS = [SFTConfig, GRPOConfig, TrainConfig, SampleConfig, DistillConfig, GenerateConfig]


@pytest.mark.parametrize("cls", _FLOAT_CONFIGS, ids=lambda c: c.__name__)
def test_every_float_field_rejects_nan_and_inf(cls):
    """--lr inf trained to all-NaN weights with exit status 0; --control_lr inf failed minutes later."""
    names = [f.name for f in dataclasses.fields(cls) if isinstance(getattr(cls(), f.name), float)]
    assert names
    for name in names:
        with pytest.raises(ValueError, match=rf"{cls.__name__}\.{name}: "):
            cls(**{name: float("nan")})
        if name != "max_seconds":  # +inf there means "no limit"
            with pytest.raises(ValueError, match=rf"{cls.__name__}\.{name}: .*finite"):
                cls(**{name: float("inf")})
    assert SFTConfig(max_seconds=float("inf")).max_seconds == float("inf")


def test_distill_and_grpo_ranges_checked_at_config_time():
    with pytest.raises(ValueError, match=r"DistillConfig\.min_lr_ratio"):
        DistillConfig(min_lr_ratio=2.0)
    with pytest.raises(ValueError, match=r"GRPOConfig\.epsilon_low"):
        GRPOConfig(epsilon_low=1.5)


@pytest.mark.parametrize("toml, where", [
    ('dynamic_sampling = "no"', r"dynamic_sampling = 'no': expected true or false \(GRPOConfig\.dynamic_sampling\)"),
    ("steps = 1.5", r"steps = 1\.5: expected an integer \(GRPOConfig\.steps\), got float"),
    ("steps = true", r"steps = true: expected an integer \(GRPOConfig\.steps\), got bool"),
    ('lr = "abc"', r"lr = 'abc': expected a number \(GRPOConfig\.lr\)"),
    ("lr = true", r"lr = true: expected a number \(GRPOConfig\.lr\), got bool"),
    ('group_size = "8"', r"group_size = '8': expected an integer"),
    ('task = ["multiply"]', r"task = \['multiply'\]: expected a string \(GRPOConfig\.task\), got list"),
    ('difficulty = "3"', r"difficulty = '3': expected an integer or none \(GRPOConfig\.difficulty\)"),
    ("share_prefix = 1", r"share_prefix = 1: expected true or false"),
])
def test_toml_values_are_type_checked(tmp_path, toml, where):
    path = tmp_path / "run.toml"
    path.write_text(toml + "\n")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: {where}"):
        parse_config(GRPOConfig, ["--config", str(path)])


def test_toml_nested_tables_type_checked_and_flags_still_typed(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[sft]\nsteps = "1"\n')
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: \[sft\] steps = '1': expected an integer \(SFTConfig\.steps\)"):
        parse_config(TrainConfig, ["--config", str(path)])
    path.write_text("grpo = 5\n")
    with pytest.raises(ValueError, match=r"field 'grpo' must be a table"):
        parse_config(TrainConfig, ["--config", str(path)])
    path.write_text("[grpo]\nlr = 1\nsteps = 3\ndifficulty = 2\n")  # an int where a float is expected is fine
    cfg = parse_config(TrainConfig, ["--config", str(path), "--sft.lr", "2", "--sft.difficulty", "none",
                                     "--grpo.share_prefix", "false", "--control_lr", "1"])
    assert cfg.grpo.lr == 1.0 and type(cfg.grpo.lr) is float and cfg.grpo.steps == 3 and cfg.grpo.difficulty == 2
    assert cfg.sft.lr == 2.0 and cfg.sft.difficulty is None and cfg.grpo.share_prefix is False


@pytest.mark.parametrize("cls", [SFTConfig, GRPOConfig, SampleConfig, GenerateConfig], ids=lambda c: c.__name__)
@pytest.mark.parametrize("template, msg", [("{question} {foo}", r"unknown placeholder \{foo\}"),
                                           ("{question}{", "not a valid format string"),
                                           ("{question} {0}", "not a valid format string"),
                                           ("{{question}}", ".*escaped"), ("no field", "must contain")])
def test_prompt_template_errors_name_the_field(cls, template, msg):
    with pytest.raises(ValueError, match=rf"{cls.__name__}\.prompt_template: {msg}"):
        cls(prompt_template=template)
    assert cls(prompt_template="Q: {question} {{json}}\n").prompt_template and cls(prompt_template="{question!r}")


def test_backend_must_run_on_the_device(monkeypatch):
    """--backend triton / cuda on a CPU-only run passed the config and failed after the first rollout."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match=r"GRPOConfig\.backend: cannot run on device 'cpu' .*TRITON_INTERPRET"):
        GRPOConfig(backend="triton", device="cpu")
    with pytest.raises(ValueError, match=r"GRPOConfig\.backend: cannot run on device 'cpu' .*cuda backend"):
        GRPOConfig(backend="cuda", device="cpu")
    assert GRPOConfig(backend="cpp", device="cpu").backend == "cpp"
    assert GRPOConfig(backend="reference", device="cpu").backend == "reference"
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"GRPOConfig\.backend"):
            GRPOConfig(backend="cuda")  # device auto: the CPU here
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert GRPOConfig(backend="triton", device="cpu").backend == "triton"


def _grpo_checkpoint(tmp_path):
    model, tok = micro_model()
    opt = make_optimizer(model, GRPOConfig())
    state = {"step": 3, "elapsed": 1.0, "config": dataclasses.asdict(GRPOConfig()), "stage": "grpo"}
    return model, opt, save_checkpoint(str(tmp_path / "run"), model, opt, state, tok)


def test_resume_refuses_another_stages_checkpoint(tmp_path):
    """`reasonrl sft --resume --out_dir <a GRPO run>` resumed the GRPO checkpoint as SFT."""
    model, opt, _ = _grpo_checkpoint(tmp_path)
    sft = SFTConfig(resume=True, out_dir=str(tmp_path / "run"))
    with pytest.raises(ValueError, match=r"written by stage 'grpo' \(GRPO\), but this is stage 'sft' \(SFT\)"):
        resume_or_start(sft, model, make_optimizer(model, sft), "sft")
    step, _, _ = resume_or_start(GRPOConfig(resume=True, out_dir=str(tmp_path / "run")), model, opt, "mt_grpo")
    assert step == 3  # same trainer, another stage name (r1's mt_grpo): resumes


def test_corrupt_checkpoint_files_are_named(tmp_path):
    model, opt, path = _grpo_checkpoint(tmp_path)
    cfg = GRPOConfig(resume=True, out_dir=str(tmp_path / "run"))
    state = os.path.join(path, "state.json")
    good = open(state).read()
    open(state, "w").write(good[:20])
    with pytest.raises(ValueError, match=rf"{re.escape(state)}' is corrupt \(not valid JSON"):
        resume_or_start(cfg, model, opt, "grpo")
    open(state, "w").write(json.dumps({**json.loads(good), "step": "3"}))
    with pytest.raises(ValueError, match=rf"{re.escape(state)}' is corrupt"):
        resume_or_start(cfg, model, opt, "grpo")
    open(state, "w").write(good)
    weights = os.path.join(path, "model.safetensors")
    data = open(weights, "rb").read()
    open(weights, "wb").write(data[:len(data) // 2])
    with pytest.raises(ValueError, match=rf"{re.escape(weights)}' is corrupt or truncated"):
        resume_or_start(cfg, model, opt, "grpo")
    open(weights, "wb").write(data)
    opt_file = os.path.join(path, "optimizer.safetensors")
    open(opt_file, "wb").write(b"\x00" * 4)
    with pytest.raises(ValueError, match=rf"{re.escape(opt_file)}' is corrupt or truncated"):
        resume_or_start(cfg, model, opt, "grpo")


def test_ctrl_c_finishes_the_step_then_saves(tmp_path):
    """A real SIGINT to `reasonrl sft`: the step in flight finishes, is saved and logged, exit 130;
    the checkpoint's step is the last metrics line's step."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-m", "reasonrl", "sft", "--steps", "100000", "--log_every", "1",
                          "--num_examples", "64", "--batch_size", "8", "--out_dir", str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics, t0 = out / "metrics.jsonl", time.time()
    while not (metrics.exists() and metrics.read_text().count("\n") >= 3):
        assert p.poll() is None and time.time() - t0 < 120, p.stdout.read() if p.poll() is not None else "timeout"
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    text, _ = p.communicate(timeout=120)
    assert p.returncode == 130, text[-2000:]
    assert "finishing this step, then saving" in text and "interrupted: saved" in text
    last = json.loads(metrics.read_text().splitlines()[-1])["step"]
    assert latest_checkpoint(str(out)).endswith(f"step-{last:07d}")


def test_old_and_ref_logprobs_only_for_unmasked_tokens():
    """_old_and_ref computes the old/reference log-probs of the live response tokens only; masked
    ones (shorter completions, masked truncations) are 0, the others those of a plain forward."""
    model = init_model(dataclasses.replace(ModelConfig.from_json(builtin_path("tiny")), num_hidden_layers=1),
                       seed=3).double()
    prompts, responses = [[5, 6, 7]] * 2 + [[8, 9]] * 2, [[10, 11, 12, 13], [14], [15, 16], [17, 18, 19]]
    ids, pos, ctx, _, rows = pack(prompts, responses)
    T = rows.shape[1]
    resp_ids = torch.tensor([r + [0] * (T - len(r)) for r in responses])
    mask = (torch.arange(T)[None, :] < torch.tensor([len(r) for r in responses])[:, None]).float()
    mask[3] = 0  # a masked truncation
    cfg = GRPOConfig(mu=2, backend="reference")
    old, ref = grpo_mod._old_and_ref(model, model, ids, pos, ctx, rows, resp_ids, mask, cfg)
    with torch.no_grad():
        lp = torch.log_softmax(model.compute_logits(model(ids, pos, ctx)[rows.view(-1)]).double(), -1)
        want = lp.gather(1, resp_ids.view(-1, 1)).view(resp_ids.shape) * mask
    for got in (old, ref):
        assert got.shape == resp_ids.shape and (got[mask == 0] == 0).all()
        assert (got - want).abs().max().item() < 1e-10


_HEAP_PROBE = r"""
import json, resource, sys, torch
from reasonrl.train.common import keep_freed_memory
def rss_mib():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 >> 20
def faults():  # minor page faults of allocating, filling and freeing a 48 MiB tensor (above glibc's 32 MiB cap)
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(12 << 20).fill_(1.0)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
faults()
before = faults()
on = keep_freed_memory(torch.device(sys.argv[1]))
again = keep_freed_memory(torch.device("cpu"))
r0 = rss_mib()
after = [faults() for _ in range(24)]
print(json.dumps({"on": on, "again": again, "before": before, "after": after, "grew_mib": rss_mib() - r0}))
"""

_MALLOC_SHIM = r"""
#include <stddef.h>
extern void *__libc_malloc(size_t);
void *malloc(size_t n) { return __libc_malloc(n); }
"""


@pytest.mark.skipif(not (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"), reason="glibc only")
@pytest.mark.parametrize("device,env,preload", [("cpu", "1", False), ("cpu", "0", False), ("meta", "1", False),
                                                ("cpu", "1", True)])
def test_keep_freed_memory(device, env, preload, tmp_path):
    """A 48 MiB tensor is a fresh mapping each time by glibc's default (12k page faults for each one
    made); after keep_freed_memory its memory comes back from the heap. The heap may grow a few times
    first (a remainder that glibc's tcache holds, at most 7 per size, keeps a freed chunk from the
    heap's top: the function's NOTE), then no faults, and the heap holds at most 8 copies.
    REASONRL_KEEP_HEAP=0 turns it off for the process; a non-CPU device leaves malloc alone (a later CPU
    call still turns it on); a preloaded malloc that is not glibc's (a shim here) leaves it off."""
    env_vars = {**os.environ, "REASONRL_KEEP_HEAP": env, "OMP_NUM_THREADS": "1"}
    if preload:
        cc = shutil.which("cc") or shutil.which("gcc")
        if cc is None:
            pytest.skip("no C compiler for the malloc shim")
        (tmp_path / "shim.c").write_text(_MALLOC_SHIM)
        subprocess.run([cc, "-shared", "-fPIC", "-o", str(tmp_path / "shim.so"), str(tmp_path / "shim.c")], check=True)
        env_vars["LD_PRELOAD"] = str(tmp_path / "shim.so")
    out = subprocess.run([sys.executable, "-c", _HEAP_PROBE, device], capture_output=True, text=True, timeout=120,
                         env=env_vars)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["before"] > 10_000, r  # 12,288 pages of 4 KiB
    kept = env == "1" and not preload
    assert r["on"] is (kept and device == "cpu") and r["again"] is kept, r
    if kept:
        assert max(r["after"][-12:]) < 500 and r["grew_mib"] <= 8 * 48 + 16, r
    else:
        assert min(r["after"]) > 10_000, r


def test_fresh_run_sets_an_earlier_runs_checkpoints_aside(tmp_path, capsys):
    """A fresh run into a folder that holds an earlier run: its step-N folders were kept (a step already
    saved is not rewritten), `latest` then named the earlier run's weights, and a later --resume loaded
    them. Now they move to previous-<time>/, nothing deleted; the new run's checkpoints are its own."""
    cfg = _sft_cfg(tmp_path, steps=4, save_every=2, keep_checkpoints=0)
    run_sft(cfg, *micro_model()[:2])
    first = load_model(os.path.join(latest_checkpoint(cfg.out_dir)))
    run_sft(dataclasses.replace(cfg, lr=1e-3, seed=4), *micro_model(seed=5)[:2])
    assert "held an earlier run's checkpoints: moved to" in capsys.readouterr().out
    aside = [d for d in os.listdir(cfg.out_dir) if d.startswith("previous-")]
    assert len(aside) == 1
    old = os.path.join(cfg.out_dir, aside[0])
    assert sorted(d for d in os.listdir(old) if d.startswith("step-")) == ["step-0000002", "step-0000004"]
    assert os.path.isfile(os.path.join(old, "metrics.jsonl")) and os.path.isdir(os.path.join(old, "final"))
    now = latest_checkpoint(cfg.out_dir)
    assert now.endswith("step-0000004") and json.load(open(os.path.join(now, "state.json")))["config"]["lr"] == 1e-3
    second = load_model(now)
    assert not all(torch.equal(a, b) for a, b in zip(first.parameters(), second.parameters()))
    assert [json.loads(x)["step"] for x in open(os.path.join(cfg.out_dir, "metrics.jsonl"))] == [1, 2, 3, 4]


def test_resume_warns_about_changed_settings(tmp_path, capsys):
    cfg = _sft_cfg(tmp_path, steps=2)
    run_sft(cfg, *micro_model()[:2])
    capsys.readouterr()
    run_sft(dataclasses.replace(cfg, resume=True, steps=3, lr=5e-3), *micro_model()[:2])
    out = capsys.readouterr().out
    assert "settings that differ from its run's: lr 0.003 -> 0.005" in out
    assert "steps" not in out.split("differ from its run's:")[1].splitlines()[0]  # extending a run is free


def test_stage_bar_by_steps_or_by_time(monkeypatch, capsys):
    """Both stages show a progress bar on a terminal: by steps, or by seconds where a wall-clock budget
    ends the stage (the default run's GRPO and control stages: steps 10**4 and 10**9)."""
    from reasonrl.train.common import StageBar
    monkeypatch.setattr(os, "isatty", lambda fd: True)
    bar = StageBar("grpo", 10_000, 240.0)
    assert bar.by_time and bar.bar.total == 240
    bar.tick(3, 12.4)
    bar.write("[grpo] a log line")
    bar.close()
    bar = StageBar("sft", 950, 0.0, step=10)
    assert not bar.by_time and bar.bar.total == 950 and bar.bar.n == 10
    bar.tick(11, 1.0)
    assert bar.bar.n == 11
    bar.close()
    out, err = capsys.readouterr()
    assert "[grpo] a log line" in out and "grpo" in err and "step 3" in err


def test_metrics_lines_are_strict_json(tmp_path):
    """accuracy is NaN without an accuracy reward: metrics.jsonl holds null there, not a bare NaN."""
    from reasonrl.train.logger import MetricsLogger
    m = MetricsLogger(str(tmp_path))
    assert "accuracy nan" in m.log({"step": 1, "accuracy": float("nan"), "kl": float("inf"), "loss": 0.5})
    line = open(m.path).read()
    assert json.loads(line, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}")) == \
        {"step": 1, "accuracy": None, "kl": None, "loss": 0.5}


def test_accuracy_filter_without_an_accuracy_reward_says_so(tmp_path, capsys):
    """filter_on='accuracy' (the default) falls back to the total reward's variance for a task with no
    accuracy reward: said once at the start, not silently."""
    model, tok = micro_model()
    run_grpo(_grpo_cfg(tmp_path, steps=1, rewards="test_train:length_reward:1.0", filter_on="accuracy"),
             model=model, tokenizer=tok)
    assert "have no accuracy reward: their groups are kept or dropped by the variance of their total" in \
        capsys.readouterr().out
    from reasonrl.rl.tasks import get_task
    get_task("jsonl:" + str(_jsonl_for_difficulty(tmp_path)), difficulty=3)
    assert "has no difficulty knob" in capsys.readouterr().out


def _jsonl_for_difficulty(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"question": "1+1?", "answer": "2"}) + "\n")
    return f


# ---- found by an audit (2026-11-29) -------------------------------------------------------------------
class _Comp:
    def __init__(self, ids):
        self.token_ids, self.finish_reason = ids, "stop"


class _Recorder:  # stands in for AdamW: keeps the gradients of each step
    def __init__(self, model):
        self.model, self.grads = model, []

    def step(self):
        self.grads.append(torch.cat([p.grad.flatten() for p in self.model.parameters() if p.grad is not None]))

    def zero_grad(self, set_to_none=True):
        self.model.zero_grad(set_to_none=set_to_none)


def _groups(rewards):
    prompts = [[1, 5, 6, 7, 8], [1, 9, 10], [1, 11, 12]]
    resp = [[[4, 9, 3, 2], [2, 6, 5], [3, 3, 3, 7, 8]], [[4, 4], [9, 9, 9], [5]], [[6, 7], [8], [9, 10, 11]]]
    return [{"prompt": p, "completions": [_Comp(r) for r in rs], "rewards": list(w)}
            for p, rs, w in zip(prompts, resp, rewards)]


def test_moe_balance_loss_weighted_alike_for_every_loss_type():
    """Under dapo the micro-batch weight is 1, and the MoE balance loss of each micro-batch was added
    with it: K micro-batches counted it K times (grad norm 5.5x one batch's where grpo gave 1.8x)."""
    from reasonrl.ops.grpo import GRPOLossConfig
    tiny = ModelConfig.from_json(builtin_path("tiny"))
    mcfg = ModelConfig(arch="qwen3_moe", vocab_size=tiny.vocab_size, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, head_dim=16, num_experts=4,
                       num_experts_per_tok=2, moe_intermediate_size=16, router_aux_loss_coef=0.5,
                       tie_word_embeddings=True)
    groups = _groups([[1.0] * 3, [0.0] * 3, [0.5] * 3])  # equal rewards: only the balance loss has a gradient
    grads = {}
    for lt in ("dapo", "grpo", "bnpo"):
        model = init_model(mcfg, seed=0).double()
        cfg = GRPOConfig(loss_type=lt, micro_batch_tokens=1, group_size=3, grad_clip=0.0, backend="reference")
        rec = _Recorder(model)
        grpo_mod.train_on_groups(model, None, rec, groups, cfg, GRPOLossConfig(loss_type=lt, max_completion_length=8))
        grads[lt] = rec.grads[0]
    assert grads["dapo"].norm() > 0
    for lt in ("grpo", "bnpo"):
        assert torch.allclose(grads["dapo"], grads[lt], rtol=1e-10, atol=1e-14), lt


def test_clip_frac_is_logged_from_every_pass():
    """It was taken from the first pass only, where the ratio is 1 by construction: always 0."""
    from reasonrl.ops.grpo import GRPOLossConfig
    model, _ = micro_model()
    cfg = GRPOConfig(mu=4, lr=0.05, micro_batch_tokens=100000, group_size=3, backend="reference")
    s = grpo_mod.train_on_groups(model, None, make_optimizer(model, cfg), _groups([[1.0, 0.0, 0.5], [0.3, 0.0, 1.0],
                                                                                 [0.0, 1.0, 0.0]]),
                                 cfg, GRPOLossConfig(max_completion_length=8))
    assert 0 < s["clip_frac"] <= 1


def test_refills_draw_new_questions():
    """A refill round passed only the fixed exclusions, so it redrew questions of the same step: a dropped
    group's question came back (193 of 200 steps with a 300-line dataset, 2026-11-30), or a kept one was
    twice in the batch. Rounds now exclude the step's earlier questions."""
    from types import SimpleNamespace

    from reasonrl.train.grpo import make_tasks, rollout

    class AllSame:  # every completion the same: zero reward variance, every group dropped
        def generate(self, prompts, params, n=1):
            return [[SimpleNamespace(text="<think></think><answer>0</answer>", length=3, finish_reason="stop")] * n
                    for _ in prompts]

    tok = load_tokenizer(builtin_path("tiny"))
    cfg = GRPOConfig(task="multiply", difficulty=2, prompts_per_step=8, group_size=2, max_refills=5)
    tasks = make_tasks(cfg)
    for step in range(3):
        kept, stats = rollout(AllSame(), tok, tasks, cfg, step, set())
        questions = [tuple(g["prompt"]) for g in stats["all"]]  # (token ids)
        assert not kept and len(questions) == 8 * 6 and len(set(questions)) == len(questions)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo", "dr_grpo"])
def test_train_on_groups_equals_the_loss_on_the_whole_batch(loss_type):
    """An independent oracle for the trainer's wiring (mutation-testing survivors, 2026-11-30: the truncation
    mask, the padding mask, dapo's active-token count, bnpo's micro-batch weight and the temperature could
    each be broken with every test passing): the gradient of one train_on_groups step, with micro-batches of
    one group or one of everything, equals that of grpo_loss_reference over logits computed one sequence at
    a time, at T = 0.7, with two truncated completions masked."""
    from reasonrl.models import AttnContext
    from reasonrl.ops.grpo import GRPOLossConfig, grpo_loss_reference

    model = micro_model()[0].double()
    groups = _groups([[1.0, 0.0, 0.5], [0.3, 0.0, 1.0], [0.0, 1.0, 0.0]])
    groups[0]["completions"][2].finish_reason = "length"
    groups[1]["completions"][0].finish_reason = "length"
    temp, loss_cfg = 0.7, GRPOLossConfig(loss_type=loss_type, max_completion_length=8)
    # the oracle
    W = model.lm_head_weight
    seqs = [(g["prompt"], c) for g in groups for c in g["completions"]]
    Tm = max(len(c.token_ids) for _, c in seqs)
    logits = torch.zeros(len(seqs), Tm, W.shape[0], dtype=torch.float64)
    rows = []
    for p, c in seqs:
        s = p + c.token_ids
        h = model(torch.tensor(s), torch.arange(len(s)), AttnContext.from_lengths([len(s)]))
        rows.append(h[len(p) - 1:len(s) - 1] @ W.T)
    logits = torch.stack([torch.cat([r, r.new_zeros(Tm - len(r), r.shape[1])]) for r in rows])
    ids = torch.tensor([c.token_ids + [0] * (Tm - len(c.token_ids)) for _, c in seqs])
    mask = torch.tensor([[float(j < len(c.token_ids) and c.finish_reason != "length") for j in range(Tm)]
                         for _, c in seqs])
    rewards = torch.tensor([r for g in groups for r in g["rewards"]], dtype=torch.float32)
    loss, _ = grpo_loss_reference(logits, ids=ids, mask=mask, rewards=rewards, group_size=3, temperature=temp,
                                  config=loss_cfg, num_items_in_batch=int(mask.sum()) if loss_type == "dapo" else None)
    model.zero_grad()
    loss.backward()
    want = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    assert want.norm() > 0
    for budget, mu in ((1, 1), (100000, 1), (100000, 2)):  # mu = 2: the first pass's old log-probs (at T)
        model.zero_grad()
        cfg = GRPOConfig(loss_type=loss_type, micro_batch_tokens=budget, group_size=3, grad_clip=0.0,
                         backend="reference", temperature=temp, truncation="mask", mu=mu)
        rec = _Recorder(model)
        sums = grpo_mod.train_on_groups(model, None, rec, groups, cfg, loss_cfg)
        assert sums["tokens"] == mask.sum().item()
        # (float32 where the trainer keeps it: the old log-probs, 1e-5 of the gradient; the mutants moved it 20%+)
        err = (rec.grads[0] - want).abs().max() / want.abs().max()
        assert err < 1e-5, (loss_type, budget, mu, float(err))


def test_run_grpo_hands_its_settings_to_the_loss(tmp_path, monkeypatch):
    """run_grpo's GRPOLossConfig could take epsilon_low for epsilon_high, or drop the advantage estimator or
    dr_grpo's max_completion_length, with every test passing (mutation testing, 2026-11-30)."""
    seen = []
    real = grpo_mod.train_on_groups
    monkeypatch.setattr(grpo_mod, "train_on_groups", lambda *a: seen.append(a[5]) or real(*a))
    model, tok = micro_model()
    run_grpo(_grpo_cfg(tmp_path, steps=1, advantage="rloo", epsilon_low=0.15, epsilon_high=0.31, beta=0.02,
                       loss_type="dr_grpo", max_tokens=11), model=model, tokenizer=tok)
    (lc,) = seen
    assert (lc.advantage, lc.epsilon_low, lc.epsilon_high, lc.beta, lc.loss_type, lc.max_completion_length) == \
        ("rloo", 0.15, 0.31, 0.02, "dr_grpo", 11)


def test_train_on_groups_with_a_reference_model_equals_the_oracle():
    """beta > 0 had no oracle: the reference model's log-probs (at the sampling temperature, as the policy's)
    enter the KL term; a reference taken at T = 1, from the policy, or from the wrong rows would move the
    gradient. One step's gradient against grpo_loss_reference with ref_logprobs from a perturbed copy."""
    import copy

    from reasonrl.models import AttnContext
    from reasonrl.ops.grpo import GRPOLossConfig, grpo_loss_reference

    model = micro_model()[0].double()
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    groups = _groups([[1.0, 0.0, 0.5], [0.3, 0.0, 1.0]])
    temp, loss_cfg = 0.7, GRPOLossConfig(loss_type="grpo", beta=0.5)
    seqs = [(g["prompt"], c) for g in groups for c in g["completions"]]
    Tm = max(len(c.token_ids) for _, c in seqs)

    def logits_of(m):
        rows = []
        for p, c in seqs:
            s = p + c.token_ids
            h = m(torch.tensor(s), torch.arange(len(s)), AttnContext.from_lengths([len(s)]))
            rows.append(h[len(p) - 1:len(s) - 1] @ m.lm_head_weight.T)
        return torch.stack([torch.cat([r, r.new_zeros(Tm - len(r), r.shape[1])]) for r in rows])

    ids = torch.tensor([c.token_ids + [0] * (Tm - len(c.token_ids)) for _, c in seqs])
    mask = torch.tensor([[float(j < len(c.token_ids)) for j in range(Tm)] for _, c in seqs])
    with torch.no_grad():
        ref_lp = torch.log_softmax(logits_of(ref) / temp, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1) * mask
    rewards = torch.tensor([r for g in groups for r in g["rewards"]], dtype=torch.float32)
    loss, metrics = grpo_loss_reference(logits_of(model), ids=ids, mask=mask, rewards=rewards, group_size=3,
                                        temperature=temp, config=loss_cfg, ref_logprobs=ref_lp)
    assert float(metrics["kl"]) > 1e-4  # the reference is far enough from the policy to matter
    model.zero_grad()
    loss.backward()
    want = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    for budget, mu in ((1, 1), (100000, 2)):
        model.zero_grad()
        cfg = GRPOConfig(loss_type="grpo", micro_batch_tokens=budget, group_size=3, grad_clip=0.0,
                         backend="reference", temperature=temp, mu=mu, beta=0.5)
        rec = _Recorder(model)
        grpo_mod.train_on_groups(model, ref, rec, groups, cfg, loss_cfg)
        err = (rec.grads[0] - want).abs().max() / want.abs().max()
        assert err < 1e-5, (budget, mu, float(err))


# ---- interrupts during a checkpoint write (sixteenth session, an audit's repros) ------------------------
def _sigint_self():
    import signal
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.05)  # the handler runs between bytecodes, right after the kill returns


def test_hold_signals_finishes_the_write_then_hands_the_interrupt_on():
    from reasonrl.train.checkpoint import hold_signals
    done = []
    with pytest.raises(KeyboardInterrupt):
        with hold_signals("t"):
            _sigint_self()
            _sigint_self()  # a second one too: still held
            done.append(1)
    assert done == [1]
    with pytest.raises(KeyboardInterrupt):  # a third abandons the block at once
        with hold_signals("t"):
            for _ in range(3):
                _sigint_self()
            done.append(2)
    assert done == [1]
    with hold_signals("t"):  # none: nothing raised, the handlers are back afterwards
        pass
    import signal
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.parametrize("stage", ["sft", "grpo"])
def test_ctrl_c_during_the_end_of_stage_save_keeps_the_stage(tmp_path, monkeypatch, stage):
    """A Ctrl-C while a stage wrote its final checkpoint exited with nothing saved (the whole stage lost
    at save_every 0); now the write finishes, then the interrupt stops the run, and a resume has nothing
    left to train."""
    import reasonrl.train.checkpoint as ck
    real, calls = ck._write_checkpoint, []

    def interrupted_write(*a, **k):
        calls.append(1)
        _sigint_self()
        return real(*a, **k)
    monkeypatch.setattr(ck, "_write_checkpoint", interrupted_write)
    if stage == "sft":
        cfg = _sft_cfg(tmp_path, out_dir=str(tmp_path / "run"))
        with pytest.raises(KeyboardInterrupt):
            run_sft(cfg, *micro_model()[:2])
    else:
        cfg = _grpo_cfg(tmp_path, steps=2)
        with pytest.raises(KeyboardInterrupt):
            run_grpo(cfg, *micro_model()[:2])
    assert calls == [1]
    assert latest_checkpoint(cfg.out_dir).endswith(f"step-{cfg.steps:07d}")


def test_a_second_ctrl_c_during_the_interrupt_save_still_saves(tmp_path, monkeypatch, capsys):
    """The first Ctrl-C asks the loop to stop and save; a second one landing in that save lost it (the
    default handler was back); now the save finishes and says where --resume starts."""
    import signal

    import reasonrl.train.checkpoint as ck
    real = ck._write_checkpoint
    monkeypatch.setattr(ck, "_write_checkpoint", lambda *a, **k: (_sigint_self(), real(*a, **k))[1])
    real_log = MetricsLogger.log

    def log(self, row, *a, **k):
        out = real_log(self, row, *a, **k)
        if row.get("step") == 3:
            os.kill(os.getpid(), signal.SIGINT)  # the first: StepGuard's, the step finishes
            time.sleep(0.05)
        return out
    monkeypatch.setattr(MetricsLogger, "log", log)
    cfg = _sft_cfg(tmp_path, out_dir=str(tmp_path / "run"))
    with pytest.raises(KeyboardInterrupt):
        run_sft(cfg, *micro_model()[:2])
    assert latest_checkpoint(cfg.out_dir).endswith("step-0000003")
    assert "interrupted while saving; --resume starts from" in capsys.readouterr().out


def test_a_changed_weight_decay_takes_effect_on_resume(tmp_path):
    """The resume warning named weight_decay 0.0 -> 0.5, but the optimizer's saved param_groups came back
    over it: the run went on with 0.0 and its next checkpoint said 0.5."""
    cfg = _sft_cfg(tmp_path, out_dir=str(tmp_path / "run"), steps=2, weight_decay=0.0)
    run_sft(cfg, *micro_model()[:2])
    model, tok = micro_model()[:2]
    cfg2 = dataclasses.replace(cfg, resume=True, weight_decay=0.5)
    opt = make_optimizer(model, cfg2)
    resume_or_start(cfg2, model, opt, "sft")
    assert all(g["weight_decay"] == 0.5 for g in opt.param_groups)
    assert opt.state  # the moments did come back


def test_grpo_on_the_builtin_random_model_says_it_trains_nothing(tmp_path, capsys):
    """Every group of a random model scores 0 and is dropped: the run logged groups 0 and kl nan for every
    step, exited 0 and saved a final model, without a word."""
    run_grpo(_grpo_cfg(tmp_path, steps=1))
    assert "WARNING: model 'tiny' is the built-in config with random weights" in capsys.readouterr().err


def test_progress_off_a_terminal_prints_plain_lines(capsys):
    """sample and eval printed nothing until the end when stderr was a log file (tqdm disabled)."""
    from reasonrl.train.common import progress_bar
    bar = progress_bar(20, "sample", "prompt")
    bar.set_postfix_str("model a")
    for _ in range(20):
        bar.update(1)
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 10 and lines[-1].startswith("[sample] 20/20 prompts (100%)") and "model a" in lines[-1]


def test_a_second_interrupt_during_a_periodic_save_says_it_was_saved(tmp_path, monkeypatch, capsys):
    """The first Ctrl-C lands in step 4's periodic save (held, then handed to the loop's guard), a second
    one right after: the message said 'not saved' although step 4 had just been written."""
    import reasonrl.train.checkpoint as ck
    real = ck._write_checkpoint

    def write(*a, **k):
        out = real(*a, **k)
        _sigint_self()  # held by hold_signals, handed to StepGuard: stop requested
        return out
    monkeypatch.setattr(ck, "_write_checkpoint", write)
    real_done = ck.StepGuard.step_done

    def step_done(self):  # the second interrupt, before the step is marked clean
        if self.stop_requested:
            raise KeyboardInterrupt
        real_done(self)
    monkeypatch.setattr(ck.StepGuard, "step_done", step_done)
    cfg = _sft_cfg(tmp_path, out_dir=str(tmp_path / "run"), save_every=4, steps=8)
    with pytest.raises(KeyboardInterrupt):
        run_sft(cfg, *micro_model()[:2])
    out = capsys.readouterr().out
    assert latest_checkpoint(cfg.out_dir).endswith("step-0000004")
    assert "saved" in out and "not saved" not in out, out[-500:]
