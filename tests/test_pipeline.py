"""The R1 stages after GRPO: rejection sampling (+ SFT on its JSONL), multi-task GRPO with per-task
metrics, the learned reward-model reward, distillation, and the whole resumable pipeline."""
import dataclasses
import json
import math
import os

import pytest
import torch

import reasonrl.train.sft as sft_mod
from reasonrl.models import ModelConfig, builtin_path, init_model, load_model, load_tokenizer, save_model
from reasonrl.rl.rewards import _RM_CACHE, accuracy_reward, compute_rewards, format_reward, parse_reward_spec
from reasonrl.rl.tasks import get_task, load_jsonl, parse_task_mix
from reasonrl.train.config import DistillConfig, GRPOConfig, PipelineConfig, SampleConfig, SFTConfig
from reasonrl.train.distill import run_distill
from reasonrl.train.grpo import draw_problems, make_tasks, run_grpo
from reasonrl.train.r1 import DONE, EXAMPLE, run_pipeline
from reasonrl.train.sample import run_sample
from reasonrl.train.sft import run_sft

TASK = "multiply"
EASY = 1  # difficulty 1: one-digit a*b, about 70 problems, learned by a micro model in seconds


pytestmark = pytest.mark.usefixtures("one_thread")


def micro_folder(path, seed=0):
    """The tiny tokenizer with a much smaller decoder, saved as a model folder (CPU tests in seconds)."""
    cfg = ModelConfig.from_json(builtin_path("tiny"))
    cfg = dataclasses.replace(cfg, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=2, num_key_value_heads=2, head_dim=16)
    save_model(init_model(cfg, seed=seed), str(path), tokenizer=load_tokenizer(builtin_path("tiny")))
    return str(path)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A micro model SFT-trained on every training problem of one-digit multiplication: most of its
    samples are right, some are wrong (what rejection sampling must sort)."""
    root = tmp_path_factory.mktemp("teacher")
    cfg = SFTConfig(model=micro_folder(root / "init"), task=TASK, difficulty=EASY, num_examples=60, steps=200,
                    batch_size=32, lr=1e-2, warmup_steps=5, log_every=1000, out_dir=str(root / "sft"))
    run_sft(cfg)
    return str(root / "sft" / "final")


def _rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# ----------------------------------------------------------------------------- rejection sampling
def test_sample_keeps_only_verified_correct_with_provenance(teacher, tmp_path):
    base = SampleConfig(model=teacher, task=TASK, difficulty=EASY, num_prompts=24, n=6, temperature=1.0,
                        max_tokens=24, chunk_prompts=10, seed=5, out=str(tmp_path / "all.jsonl"))
    s = run_sample(base)
    rows = _rows(base.out)
    problems = {p.question: p for p in get_task(TASK, EASY).problems(24, seed=5)}
    assert s["prompts"] == 24 and s["samples"] == 24 * 6 and s["kept"] == len(rows)
    assert 0 < s["kept"] < s["samples"], s  # some kept, some rejected: the filter had work to do
    assert s["pass_rate"] == pytest.approx(s["correct"] / s["samples"])
    for r in rows:
        p = problems[r["question"]]  # only the task's own training prompts
        assert r["answer"] == p.answer
        assert accuracy_reward(r["response"], p) == 1.0 and format_reward(r["response"]) == 1.0, r
        prov = r["provenance"]
        assert prov["model"] == teacher and prov["step"] == 200 and prov["task"] == TASK
        assert prov["difficulty"] == EASY and prov["seed"] == 5 and prov["temperature"] == 1.0
        assert 0 <= prov["sample_index"] < 6
    assert len({(r["question"], r["provenance"]["sample_index"]) for r in rows}) == len(rows)
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]  # atomic: no temporaries left

    short = dataclasses.replace(base, shortest=True, out=str(tmp_path / "short.jsonl"))
    assert run_sample(short)["kept"] == len({r["question"] for r in rows})  # one per solved prompt
    tok = load_tokenizer(teacher)
    for r in _rows(short.out):
        lens = [len(tok.encode(x["response"])) for x in rows if x["question"] == r["question"]]
        assert len(tok.encode(r["response"])) == min(lens)

    # the JSONL trains: `reasonrl sft --task jsonl:PATH` takes "response" as the worked solution
    probs = load_jsonl(base.out)
    assert [p.solution for p in probs] == [r["response"] for r in rows]
    sft = SFTConfig(model=teacher, task=f"jsonl:{base.out}", num_examples=len(rows), steps=3, batch_size=8,
                    log_every=1, out_dir=str(tmp_path / "rs_sft"))
    _, _, summary = run_sft(sft)
    assert summary["steps"] == 3 and all(math.isfinite(r["loss"]) for r in _rows(tmp_path / "rs_sft" / "metrics.jsonl"))


def test_jsonl_checker_round_trip(tmp_path):
    """Countdown answers are expressions: the sampled JSONL keeps the checker and its numbers."""
    p = get_task("countdown").problems(1, seed=1)[0]
    path = tmp_path / "cd.jsonl"
    path.write_text(json.dumps({"question": p.question, "answer": p.answer, "response": p.solution,
                                "checker": "countdown", "meta": p.meta}) + "\n")
    q = load_jsonl(str(path))[0]
    assert q.checker == "countdown" and accuracy_reward(p.solution, q) == 1.0
    path.write_text(json.dumps({"question": "q", "answer": "1", "checker": "eval"}) + "\n")
    with pytest.raises(ValueError, match=r"cd\.jsonl:1: 'checker'"):
        load_jsonl(str(path))


# ----------------------------------------------------------------------------- multi-task GRPO
def one_reward(response, problem):
    return 1.0


def length_reward(response, problem):
    return float(len(response))


def test_task_mix_draws_by_weight_and_parses():
    mix = parse_task_mix(" multiply=3 ; countdown=1|accuracy:1.0,format:0.1 ")
    assert mix == [("multiply", 3.0, None), ("countdown", 1.0, "accuracy:1.0,format:0.1")]
    tasks = make_tasks(GRPOConfig(tasks="multiply=3;countdown=1"))
    drawn = draw_problems(tasks, 400, seed=0, step=0, refill=0, exclude=())
    share = sum(t == 0 for t, _ in drawn) / len(drawn)
    assert 0.68 < share < 0.82, share  # 0.75 expected; binomial sd 0.022
    assert all(get_task(tasks[t][0]).name == tasks[t][1].name for t, _ in drawn)
    assert drawn == draw_problems(tasks, 400, seed=0, step=0, refill=0, exclude=())  # resumable: same draw


def test_multitask_grpo_logs_per_task_metrics(tmp_path):
    mix = "multiply=0.5|test_pipeline:one_reward;countdown=0.5|test_pipeline:length_reward:0.01,format:0.1"
    cfg = GRPOConfig(model=micro_folder(tmp_path / "m"), tasks=mix, steps=2, prompts_per_step=4, group_size=2,
                     max_tokens=8, max_refills=0, filter_on="reward", truncation="keep", lr=1e-3, warmup_steps=1,
                     out_dir=str(tmp_path / "g"), log_every=1)
    run_grpo(cfg)
    rows = _rows(tmp_path / "g" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["groups/multiply"] + r["groups/countdown"] == 4
        if r["groups/multiply"]:
            assert r["reward/multiply"] == 1.0  # its own reward spec, not the run's default
            assert "accuracy/multiply" not in r  # no accuracy reward in its spec
        if r["groups/countdown"]:
            assert r["reward/countdown"] > 0 and math.isfinite(r["reward/countdown"])
    assert any(r["groups/countdown"] for r in rows) and any(r["groups/multiply"] for r in rows)
    both = GRPOConfig(tasks="multiply=1;add=1", steps=1, prompts_per_step=4, group_size=2, max_tokens=4,
                      model=cfg.model, out_dir=str(tmp_path / "acc"), max_refills=0)
    run_grpo(both)
    r = _rows(tmp_path / "acc" / "metrics.jsonl")[0]
    assert {"accuracy/multiply", "accuracy/add", "reward/multiply", "reward/add"} <= set(r)


# ----------------------------------------------------------------------------- reward model
def tiny_reward_model(path, num_labels=1):
    from transformers import LlamaConfig, LlamaForSequenceClassification
    tok = load_tokenizer(builtin_path("tiny"))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, num_labels=num_labels,
                      pad_token_id=tok.pad_token_id, max_position_embeddings=256)
    torch.manual_seed(0)
    LlamaForSequenceClassification(cfg).save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return str(path)


def test_reward_model_reward(tmp_path):
    path = tiny_reward_model(tmp_path / "rm")
    probs = get_task(TASK).problems(5, seed=0)
    texts = [p.solution for p in probs[:3]] + ["<think>x</think><answer>1</answer>", ""]
    (name, fn, w), = parse_reward_spec(f"rm:{path}:0.5")
    assert name == f"rm:{path}" and w == 0.5
    batched = fn.batch(texts, probs)
    one = [fn(t, p) for t, p in zip(texts, probs)]
    assert all(math.isfinite(x) for x in batched) and len(set(batched)) > 1
    torch.testing.assert_close(torch.tensor(batched), torch.tensor(one), rtol=1e-5, atol=1e-6)
    # the score is the head's logit on the last real token of "question\nresponse", float64 reference
    from transformers import AutoModelForSequenceClassification
    ref_model = AutoModelForSequenceClassification.from_pretrained(path).double().eval()
    tok = load_tokenizer(path)
    with torch.no_grad():
        ref = [ref_model(**tok(f"{p.question}\n{t}", return_tensors="pt")).logits[0, 0].item()
               for t, p in zip(texts, probs)]
    torch.testing.assert_close(torch.tensor(batched, dtype=torch.float64), torch.tensor(ref, dtype=torch.float64), rtol=1e-4, atol=1e-5)
    total, parts = compute_rewards(texts, probs, parse_reward_spec(f"rm:{path}:0.5,format:0.1"))
    assert total == pytest.approx([0.5 * a + 0.1 * format_reward(t) for a, t in zip(batched, texts)])
    (_, sq, _), = parse_reward_spec(f"rm_sigmoid:{path}")
    assert sq.batch(texts, probs) == pytest.approx(torch.sigmoid(torch.tensor(batched)).tolist(), rel=1e-5)
    assert sum(os.path.realpath(path) == k for k in _RM_CACHE) == 1  # loaded once, shared
    # the helpfulness side of a mix: open-ended JSONL prompts (checker "none") scored by the reward model
    help_path = tmp_path / "help.jsonl"
    help_path.write_text("".join(json.dumps({"question": f"Say something kind {i}", "checker": "none"}) + "\n"
                                 for i in range(40)))
    cfg = GRPOConfig(model=micro_folder(tmp_path / "m"), tasks=f"multiply=1;jsonl:{help_path}=1|rm:{path}:0.5",
                     steps=2, prompts_per_step=4, group_size=2, max_tokens=6, max_refills=0, truncation="keep",
                     out_dir=str(tmp_path / "g"))
    run_grpo(cfg)
    rows = _rows(tmp_path / "g" / "metrics.jsonl")
    key = "jsonl:help.jsonl"
    assert any(r[f"groups/{key}"] for r in rows) and f"accuracy/{key}" not in rows[0]
    assert all(math.isfinite(r[f"reward/{key}"]) for r in rows if r[f"groups/{key}"])
    with pytest.raises(ValueError, match="no_such_rm"):
        parse_reward_spec(f"rm:{tmp_path / 'no_such_rm'}:1.0")
    with pytest.raises(ValueError, match=r"GRPOConfig\.tasks.*no_such_rm"):
        GRPOConfig(tasks=f"multiply=1|rm:{tmp_path / 'no_such_rm'}")


# ----------------------------------------------------------------------------- distillation
def test_distill_runs_and_writes_table(teacher, tmp_path):
    cfg = DistillConfig(teacher=teacher, student="tiny-s", task=TASK, difficulty=EASY, num_examples=10,
                        teacher_prompts=20, samples_per_prompt=4, steps=4, batch_size=8, warmup_steps=1,
                        max_tokens=24, eval_problems=5, out_dir=str(tmp_path / "d"))
    res = run_distill(cfg)
    assert res["sample"]["kept"] >= 1
    assert res["distilled"]["examples"] == 10 + res["sample"]["kept"] and res["baseline"]["examples"] == 10
    assert res["distilled"]["steps"] == res["baseline"]["steps"] == 4
    assert res["distilled"]["params"] == res["baseline"]["params"]
    assert res["distilled"]["params"] < sum(p.numel() for p in init_model(builtin_path("tiny")).parameters())
    md = (tmp_path / "d" / "distill.md").read_text()
    assert "student + teacher traces" in md and "student without traces" in md and "held-out accuracy" in md
    assert json.loads((tmp_path / "d" / "distill.json").read_text())["baseline"]["n"] == 5
    traces = load_jsonl(str(tmp_path / "d" / "teacher_traces.jsonl"))
    cold = {p.question for p in get_task(TASK, EASY).problems(10, seed=0)}
    assert not cold & {p.question for p in traces}  # the teacher answers other questions
    with pytest.raises(ValueError, match=r"DistillConfig\.teacher"):
        run_distill(dataclasses.replace(cfg, teacher=str(tmp_path / "missing")))


# ----------------------------------------------------------------------------- the whole pipeline
def _pipeline_cfg(teacher, out, **kw):
    """Micro sizes; the cold start continues from the teacher fixture so that sampling keeps some."""
    return PipelineConfig(
        sft=SFTConfig(model=teacher, task="multiply=0.7;add=0.3", difficulty=EASY, num_examples=60, steps=20,
                      batch_size=32, lr=3e-3, warmup_steps=2, log_every=1000),
        grpo=GRPOConfig(task=TASK, difficulty=EASY, steps=2, prompts_per_step=4, group_size=4, max_tokens=20,
                        max_refills=0, lr=1e-4, warmup_steps=1),
        sample=SampleConfig(task=TASK, difficulty=EASY, num_prompts=16, n=4, max_tokens=20, shortest=True),
        rs_sft=SFTConfig(steps=4, batch_size=8, lr=1e-4, warmup_steps=1, log_every=1),
        mt_grpo=GRPOConfig(tasks="multiply=0.5;add=0.5", difficulty=EASY, steps=2, prompts_per_step=4,
                           group_size=4, max_tokens=20, max_refills=0, lr=1e-4, warmup_steps=1),
        eval_problems=5, out_dir=str(out), **kw)


def _weights(path):
    return list(load_model(path).state_dict().values())


def test_pipeline_runs_and_resumes_to_the_same_result(teacher, tmp_path, monkeypatch, capsys):
    a = run_pipeline(_pipeline_cfg(teacher, tmp_path / "a"))
    assert a["completed"] == ["sft", "grpo", "sample", "rs_sft", "mt_grpo"]
    assert a["final_model"] == str(tmp_path / "a" / "mt_grpo" / "final")
    assert a["stages"]["sample"]["summary"]["kept"] >= 1
    assert set(a["stages"]["mt_grpo"]["eval"]) == {"multiply", "add"}
    assert "accuracy/add" in _rows(tmp_path / "a" / "mt_grpo" / "metrics.jsonl")[-1]
    assert "| rs_sft |" in (tmp_path / "a" / "results.md").read_text()

    cfg = _pipeline_cfg(teacher, tmp_path / "b", stop_after="grpo")  # a stage limit
    assert run_pipeline(cfg)["completed"] == ["sft", "grpo"]
    assert not os.path.exists(tmp_path / "b" / "sample")
    sft_metrics = (tmp_path / "b" / "sft" / "metrics.jsonl").read_text()
    resumed = dataclasses.replace(cfg, stop_after="", resume=True)
    real, calls = sft_mod.linear_token_logprobs, [0]

    def ctrl_c_at_step_3(*args, **kw):  # Ctrl-C inside rs_sft (the only SFT stage left to run)
        calls[0] += 1
        if calls[0] > 2:
            raise KeyboardInterrupt
        return real(*args, **kw)
    with monkeypatch.context() as m:
        m.setattr(sft_mod, "linear_token_logprobs", ctrl_c_at_step_3)
        with pytest.raises(KeyboardInterrupt):
            run_pipeline(resumed)
    assert os.path.isfile(tmp_path / "b" / "sample" / DONE) and not os.path.exists(tmp_path / "b" / "rs_sft" / DONE)
    assert os.path.isdir(tmp_path / "b" / "rs_sft" / "step-0000002")  # saved on Ctrl-C
    capsys.readouterr()
    b = run_pipeline(resumed)
    out = capsys.readouterr().out
    assert "sft: finished earlier" in out and "grpo: finished earlier" in out and "sample: finished earlier" in out
    assert "[rs_sft] resumed from" in out and "at step 2" in out
    assert (tmp_path / "b" / "sft" / "metrics.jsonl").read_text() == sft_metrics  # not rerun
    assert b["completed"] == a["completed"]
    for s in ("sft", "grpo", "rs_sft", "mt_grpo"):
        assert b["stages"][s]["eval"] == a["stages"][s]["eval"], s
    assert b["stages"]["sample"]["summary"]["kept"] == a["stages"]["sample"]["summary"]["kept"]
    def same(rows):  # provenance names each run's own model folder
        return [{**r, "provenance": {k: v for k, v in r["provenance"].items() if k != "model"}} for r in rows]
    assert same(_rows(tmp_path / "a" / "sample" / "samples.jsonl")) == same(_rows(tmp_path / "b" / "sample" / "samples.jsonl"))
    for x, y in zip(_weights(a["final_model"]), _weights(b["final_model"])):
        assert torch.equal(x, y)  # the same final model, bit for bit

    changed = dataclasses.replace(resumed, sft=dataclasses.replace(resumed.sft, lr=5e-3))
    with pytest.raises(ValueError, match=r"PipelineConfig\.sft: --resume.*sft\.lr"):
        run_pipeline(changed)


def test_bad_configs_name_the_field(teacher, tmp_path):
    with pytest.raises(ValueError, match=r"PipelineConfig\.stages.*'rl'"):
        PipelineConfig(stages="sft,rl")
    with pytest.raises(ValueError, match=r"PipelineConfig\.stages.*subsequence"):
        PipelineConfig(stages="grpo,sft")
    with pytest.raises(ValueError, match=r"PipelineConfig\.stop_after"):
        PipelineConfig(stages="sft,grpo", stop_after="sample")
    with pytest.raises(ValueError, match=r"PipelineConfig\.eval_tasks.*'nope'"):
        PipelineConfig(eval_tasks="multiply,nope")
    assert PipelineConfig(stages="all").stage_list() == ["sft", "grpo", "sample", "rs_sft", "mt_grpo"]
    for mix, why in [("multiply=0.6;nope=0.4", "'nope'"), ("multiply=abc", "not a number"),
                     ("multiply=0", "finite number > 0"), ("multiply=-1;add=2", "finite number > 0"),
                     ("multiply=inf", "finite number > 0"), ("multiply", "TASK=WEIGHT"),
                     ("multiply=1;multiply=2", "twice"), (";", "no tasks"),
                     ("multiply=1|nosuchreward", "nosuchreward"), (f"jsonl:{tmp_path}/x.jsonl=1", "no such file")]:
        with pytest.raises(ValueError, match=rf"GRPOConfig\.tasks.*{why}"):
            GRPOConfig(tasks=mix)
    with pytest.raises(ValueError, match=r"SFTConfig\.task.*only apply to GRPO"):
        SFTConfig(task="multiply=1|accuracy")
    with pytest.raises(ValueError, match=r"SampleConfig\.n"):
        SampleConfig(n=0)
    with pytest.raises(ValueError, match=r"SampleConfig\.out"):
        SampleConfig(out="x.json")
    with pytest.raises(ValueError, match=r"DistillConfig\.steps"):
        DistillConfig(steps=0)
    cfg = _pipeline_cfg(teacher, tmp_path / "p", stages="sample,rs_sft")
    cfg = dataclasses.replace(cfg, sample=dataclasses.replace(cfg.sample, model=str(tmp_path / "gone")))
    with pytest.raises(ValueError, match="gone"):
        run_pipeline(cfg)


def test_example_config_parses():
    from reasonrl.train.config import parse_config
    cfg = parse_config(PipelineConfig, ["--config", EXAMPLE])
    assert cfg.stage_list() == ["sft", "grpo", "sample", "rs_sft", "mt_grpo"]
    assert cfg.mt_grpo.tasks and cfg.sft.task == "multiply=0.7;add=0.3"
    assert os.path.basename(EXAMPLE) in open(os.path.join(os.path.dirname(EXAMPLE), "r1.py")).read()


def test_corrupt_stage_marker_and_a_table_without_evaluation(tmp_path):
    """A truncated DONE.json failed with "Unterminated string" (no file named), one without "config"
    with a KeyError traceback; with eval_problems 0 the results table's separator had one cell less."""
    from reasonrl.train.r1 import _read_marker, pipeline_table
    sc = SFTConfig()
    for text, why in [('{"stage": "sf', "not valid JSON"), ('{"stage": "sft"}', "no 'config' object"),
                      ("[1]", "no 'config' object")]:
        (tmp_path / "DONE.json").write_text(text)
        with pytest.raises(ValueError, match=rf"PipelineConfig\.sft: the marker .*DONE.json.* is corrupt \({why}"):
            _read_marker(str(tmp_path / "DONE.json"), "sft", sc)
    table = pipeline_table({"stages": {"sft": {"summary": {"steps": 3, "seconds": 2.0}}}, "final_model": "x",
                            "total_seconds": 3.0})
    head, sep, row = table.splitlines()[:3]
    assert head.count("|") == sep.count("|") == row.count("|") == 5


def test_sample_out_that_is_a_folder_fails_first(tmp_path):
    """It failed after all the sampling, leaving OUT.tmp-<pid> behind."""
    from reasonrl.train.sample import run_sample
    (tmp_path / "d.jsonl").mkdir()
    with pytest.raises(ValueError, match="SampleConfig.out: .* is a folder"):
        run_sample(SampleConfig(model=str(tmp_path / "never-loaded"), out=str(tmp_path / "d.jsonl")))


def test_resume_takes_the_out_dir_however_it_is_spelled(tmp_path, monkeypatch):
    """A DONE marker recorded sft.out_dir='r1/p/sft': --resume with --out_dir /abs/r1/p (or ./r1/p, or a
    moved run folder) was refused, and both remedies the error offered threw the finished stages away."""
    import shutil

    from reasonrl.train.r1 import _comparable, _read_marker, _write_json_atomic, stage_config
    cfg = PipelineConfig(stages="sft,grpo", out_dir=str(tmp_path / "r1"))
    sc = stage_config(cfg, "grpo", str(tmp_path / "r1" / "sft" / "final"))
    _write_json_atomic(str(tmp_path / "r1" / "grpo" / DONE), {"stage": "grpo", "config": _comparable(sc, cfg.out_dir)})
    monkeypatch.chdir(tmp_path)
    rel = dataclasses.replace(cfg, out_dir="./r1", resume=True)
    _read_marker(str(tmp_path / "r1" / "grpo" / DONE), "grpo", stage_config(rel, "grpo", "r1/sft/final"))
    shutil.move(str(tmp_path / "r1"), str(tmp_path / "moved"))
    moved = dataclasses.replace(cfg, out_dir=str(tmp_path / "moved"), resume=True)
    _read_marker(str(tmp_path / "moved" / "grpo" / DONE), "grpo",
                 stage_config(moved, "grpo", str(tmp_path / "moved" / "sft" / "final")))
    changed = dataclasses.replace(moved, grpo=dataclasses.replace(moved.grpo, lr=0.5))  # a real change: refused
    with pytest.raises(ValueError, match=r"used grpo\.lr="):
        _read_marker(str(tmp_path / "moved" / "grpo" / DONE), "grpo",
                     stage_config(changed, "grpo", str(tmp_path / "moved" / "sft" / "final")))


def test_a_pipeline_that_starts_at_sample_trains_on_from_the_sampled_model(teacher, tmp_path, capsys):
    """The sample stage records no model of its own: rs_sft then fell back to the built-in random model
    (loss 4.3 where the sampled model had 0.02), without a word."""
    cfg = dataclasses.replace(_pipeline_cfg(teacher, tmp_path / "s"), stages="sample,rs_sft",
                              sample=dataclasses.replace(_pipeline_cfg(teacher, tmp_path).sample, model=teacher))
    res = run_pipeline(cfg)
    assert res["completed"] == ["sample", "rs_sft"]
    assert f"[pipeline] rs_sft: starting from {teacher}" in capsys.readouterr().out
    first = _rows(tmp_path / "s" / "rs_sft" / "metrics.jsonl")[0]["loss"]
    assert first < 2.0, first  # a trained start (random init: ~4.4)
