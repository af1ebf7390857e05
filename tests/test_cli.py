"""The reasonrl console script: help lists every field with its default, errors name the field,
the pipeline commands (sample, distill, train --stages, eval) answer --help and fail cleanly, generate
and bench run."""
import os
import subprocess
import sys

import pytest

from reasonrl.cli import benchmarks_dir, main


def run(*args):
    return subprocess.run([sys.executable, "-m", "reasonrl.cli", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_help_lists_fields_with_defaults(capsys):
    with pytest.raises(SystemExit) as e:
        main(["grpo", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag, default in [("--group_size", "8"), ("--lr", "0.0001"), ("--rewards", "'accuracy:1.0,format:0.1'"),
                          ("--truncation", "'mask'"), ("--resume", "False")]:
        assert flag in out and f"(default: {default})" in out, flag
    # each field's comment in its config class is its help text
    assert "G samples per prompt" in " ".join(out.split()) and "nucleus sampling" in " ".join(out.split())
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "--sft.steps" in out and "--grpo.max_seconds" in out and "(default: 950)" in out and "(default: 240.0)" in out


def test_top_level_help(capsys):
    main([])
    assert "reasonrl train" in capsys.readouterr().out


def fails(*args) -> str:
    """Run main() in-process; it must exit with an error; returns the message."""
    with pytest.raises(SystemExit) as e:
        main(list(args))
    assert e.value.code not in (0, None)
    return str(e.value.code)


def test_bad_values_name_the_field(capsys):
    assert "GRPOConfig.group_size" in fails("grpo", "--group_size", "1")
    assert "SFTConfig.lr" in fails("train", "--sft.lr", "-1")
    assert "--steps" in fails("sft", "--steps", "x")
    assert "unknown command" in fails("frobnicate")
    assert "unrecognized arguments" in (fails("sft", "--no_such_field", "1") + capsys.readouterr().err)
    # a nested stage's error says which stage (SFTConfig.lr could be sft's, rs_sft's or the control's)
    assert "[rs_sft] SFTConfig.lr: must be > 0" in fails("train", "--stages", "all", "--rs_sft.lr", "0")
    assert "[sft] SFTConfig.lr" in fails("train", "--sft.lr", "-1")


@pytest.mark.parametrize("flag, instead", [("--sft.seed", "--seed"), ("--grpo.seed", "--seed"),
                                           ("--sft.out_dir", "--out_dir"), ("--grpo.out_dir", "--out_dir"),
                                           ("--grpo.model", "--sft.model")])
def test_train_refuses_flags_it_would_override(flag, instead):
    """`reasonrl train` sets each stage's seed and out_dir, and GRPO's model, itself: these flags were
    listed in --help and then silently replaced."""
    msg = fails("train", flag, "7")
    assert "sets it itself" in msg and f"set {instead} instead" in msg


@pytest.mark.parametrize("args, field, hint", [
    (["--grpo.seed", "5"], "grpo.seed", "set --seed"),
    (["--grpo.model", "x"], "grpo.model", "set --sft.model"),
    (["--grpo.out_dir", "x"], "grpo.out_dir", "set --out_dir"),
    (["--grpo.resume"], "grpo.resume", "set --resume"),
    (["--stages", "sft,grpo,sample,rs_sft", "--sample.out", "k.jsonl"], "sample.out", "set --out_dir"),
    (["--stages", "sft,grpo,sample,rs_sft", "--rs_sft.task", "add"], "rs_sft.task", "sample stage's output"),
])
def test_pipeline_refuses_flags_it_would_override(args, field, hint):
    """The R1 pipeline set these itself and ignored the flags (and TOML values) without a word."""
    argv = args if "--stages" in args else ["--stages", "sft,grpo", *args]
    msg = fails("train", *argv)
    assert f"PipelineConfig.{field}: the pipeline sets it itself" in msg and hint in msg, msg


@pytest.mark.parametrize("stages", [[], ["--stages", "sft,grpo"]])
@pytest.mark.parametrize("args, field", [
    (["--grpo.device", "cuda:7"], "grpo.device"), (["--grpo.max_tokens", "5000"], "grpo.max_tokens"),
    (["--grpo.task", "multipy"], "grpo.task"),
])
def test_train_checks_later_stages_before_the_first_trains(tmp_path, stages, args, field):
    """A bad GRPO device, task or max_tokens failed only after the SFT stage had trained (4 minutes of
    the default run); max_tokens's error named no field."""
    if stages:  # else the pipeline's held-out sets (grpo.task by default) refuse the task first
        args = args + ["--eval_tasks", "multiply"]
    msg = fails("train", "--out_dir", str(tmp_path), *stages, *args)
    assert f"Config.{field}" in msg, msg
    assert not os.path.exists(tmp_path / "sft") or not os.listdir(tmp_path / "sft")


def test_diverged_run_ends_with_one_line_and_a_checkpoint(tmp_path):
    """A non-finite gradient norm raised a FloatingPointError traceback and saved nothing."""
    msg = fails("sft", "--out_dir", str(tmp_path), "--steps", "3", "--lr", "1e30", "--warmup_steps", "0")
    assert "non-finite gradient norm" in msg and "saved" in msg and "--resume" in msg, msg
    assert os.path.isfile(tmp_path / "latest")
    # float fields become float32 tensors: 1e300 was finite here and NaN there
    assert "GRPOConfig.beta: must be within float32's range" in fails("grpo", "--beta", "1e300")


def test_config_parsing_edge_cases(tmp_path):
    """Each was a traceback or an error that named no field."""
    (tmp_path / "g5.toml").write_text("grpo = 5\n")
    assert "grpo must be a table of fields" in fails("train", "--config", str(tmp_path / "g5.toml"), "--grpo.lr", "1e-3")
    (tmp_path / "big.toml").write_text("lr = 1" + "0" * 400 + "\n")  # OverflowError in float()
    assert "SFTConfig.lr), got an integer out of range" in fails("sft", "--config", str(tmp_path / "big.toml"))
    assert "SFTConfig.seed), got an integer out of range" in fails("sft", "--seed", "9" * 23)  # failed in torch
    # argparse took "-1e-4" for an option: "expected one argument"
    assert "SFTConfig.lr: must be > 0, got -0.0001" in fails("sft", "--lr", "-1e-4")
    assert "SFTConfig.lr: must be a finite number, got -inf" in fails("sft", "--lr", "-inf")
    from reasonrl.train.config import GRPOConfig, parse_config
    assert parse_config(GRPOConfig, ["--truncation_reward", "-1e-3"]).truncation_reward == -1e-3


def test_console_script_reports_errors_without_traceback():
    r = run("grpo", "--group_size", "1")
    assert r.returncode != 0 and "GRPOConfig.group_size" in r.stderr and "Traceback" not in r.stderr


def test_pipeline_commands_help_and_errors(tmp_path, capsys):
    for cmd, flags in [(["sample"], ["--n", "--shortest", "--out"]), (["distill"], ["--teacher", "--student"]),
                       (["train", "--stages", "all"], ["--rs_sft.steps", "--mt_grpo.tasks", "--stop_after"]),
                       (["eval"], ["--model"])]:
        with pytest.raises(SystemExit) as e:
            main([*cmd, "--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert all(f in out for f in flags), (cmd, flags)
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "--rs_sft.steps" not in capsys.readouterr().out  # no arguments: still the default run's config
    assert "no_model_here" in fails("sample", "--model", str(tmp_path / "no_model_here"), "--num_prompts", "1")
    assert "DistillConfig.teacher" in fails("distill", "--teacher", str(tmp_path / "none"))
    assert "PipelineConfig.stages" in fails("train", "--stages", "sft,nope")
    assert "GRPOConfig.tasks" in fails("grpo", "--tasks", "multiply=2;nope=1")


def test_generate_runs(capsys):
    main(["generate", "--num", "2", "--max_tokens", "5"])
    out = capsys.readouterr()
    assert len([x for x in out.out.splitlines() if "->" in x]) == 2
    assert "random weights" in out.err  # a built-in name is an untrained model: say so


def test_bench_lists_and_rejects(capsys):
    if not os.path.isdir(benchmarks_dir()):
        pytest.skip("no benchmarks folder next to the package")
    main(["bench"])
    assert "benchmarks in" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="unknown benchmark"):
        main(["bench", "no_such_bench"])


def test_bench_passes_threads_to_the_script(monkeypatch):
    """`bench NAME --threads 2`: the script's own flag (the CLI used to take it and run the script with
    its default of 1 thread); `--threads` before `bench` is still the CLI's."""
    import torch

    import reasonrl.cli as cli
    if not os.path.isdir(benchmarks_dir()):
        pytest.skip("no benchmarks folder next to the package")
    calls = []
    monkeypatch.setattr(cli.subprocess, "call", lambda cmd: calls.append(cmd) or 0)
    n = torch.get_num_threads()
    try:
        with pytest.raises(SystemExit):
            main(["--threads", "1", "bench", "trl", "--threads", "2", "--steps", "1"])
        assert calls[-1][-4:] == ["--threads", "2", "--steps", "1"]
        assert torch.get_num_threads() == 1
        with pytest.raises(SystemExit):
            main(["bench", "rollout", "--threads", "2"])
        assert calls[-1][-2:] == ["--threads", "2"] and calls[-1][-3].endswith("bench_rollout.py")
        # `--threads` before `bench` reaches the script (a child process) through OMP_NUM_THREADS: it was lost
        monkeypatch.setenv("OMP_NUM_THREADS", "7")  # restored after the test
        with pytest.raises(SystemExit):
            main(["--threads", "1", "bench", "logprobs"])
        assert os.environ["OMP_NUM_THREADS"] == "1" and calls[-1][-1].endswith("bench_logprobs.py")
    finally:
        torch.set_num_threads(n)


@pytest.mark.parametrize("script", ["logprobs", "grpo", "model", "moe", "rollout", "trl"])
def test_every_benchmark_takes_threads(script):
    import subprocess
    if not os.path.isdir(benchmarks_dir()):
        pytest.skip("no benchmarks folder next to the package")
    out = subprocess.run([sys.executable, os.path.join(benchmarks_dir(), f"bench_{script}.py"), "--help"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--threads" in out.stdout, out.stderr[-500:]


def test_convert_gguf_errors_cleanly(tmp_path):
    assert "convert-gguf" in fails("convert-gguf", str(tmp_path / "missing.gguf"), "--out", str(tmp_path / "out"))


# ------------------------------------------------------------------- bad input: one clear line, early
def nan_reward(response, problem):
    return float("nan")


def test_non_finite_flags_fail_naming_the_field():
    assert "GRPOConfig.lr: must be a finite number" in fails("grpo", "--lr", "inf")
    assert "SFTConfig.lr: must be a finite number" in fails("sft", "--lr", "nan")
    assert "TrainConfig.control_lr: must be a finite number" in fails("train", "--control_lr", "inf")
    assert "GRPOConfig.truncation_reward" in fails("grpo", "--truncation_reward=-inf")
    assert "GRPOConfig.prompt_template: unknown placeholder {foo}" in fails("grpo", "--prompt_template", "{question} {foo}")


def test_toml_type_errors_name_file_table_and_key(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('dynamic_sampling = "no"\n')
    msg = fails("grpo", "--config", str(toml))
    assert str(toml) in msg and "dynamic_sampling = 'no': expected true or false" in msg
    toml.write_text('stages = "sft"\n[sft]\nsteps = "1"\n')
    msg = fails("train", "--config", str(toml))
    assert str(toml) in msg and "[sft] steps = '1': expected an integer (SFTConfig.steps)" in msg


def test_unavailable_backend_fails_before_any_work(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "GRPOConfig.backend: cannot run on device 'cpu'" in fails("grpo", "--backend", "triton", "--device", "cpu")
    assert "GRPOConfig.backend: cannot run on device 'cpu'" in fails("grpo", "--backend", "cuda", "--device", "cpu")


def test_sft_resume_refuses_a_grpo_checkpoint(tmp_path):
    run_dir = tmp_path / "grpo_run"
    (run_dir / "step-0000002").mkdir(parents=True)
    (run_dir / "step-0000002" / "state.json").write_text(
        '{"step": 2, "elapsed": 1.0, "stage": "grpo", "config": {"group_size": 8}, "rng": {}}')
    (run_dir / "latest").write_text("step-0000002")
    msg = fails("sft", "--resume", "--out_dir", str(run_dir), "--num_examples", "4", "--steps", "1")
    assert "written by stage 'grpo' (GRPO), but this is stage 'sft' (SFT)" in msg


def test_nan_custom_reward_is_an_error_not_a_dropped_group(tmp_path):
    msg = fails("grpo", "--rewards", "accuracy,test_cli:nan_reward", "--steps", "1", "--prompts_per_step", "1",
                "--group_size", "2", "--max_tokens", "2", "--out_dir", str(tmp_path / "g"))
    assert "reward 'test_cli:nan_reward' returned nan for completion 0" in msg


def test_sample_with_nothing_kept_warns_and_suggests_no_invalid_command(tmp_path, capsys):
    out = tmp_path / "s.jsonl"
    main(["sample", "--model", "tiny", "--num_prompts", "2", "--n", "2", "--max_tokens", "2", "--out", str(out)])
    cap = capsys.readouterr()
    assert "kept 0" in cap.out and "--num_examples 0" not in cap.out + cap.err
    assert "WARNING: no sample passed" in cap.err
    assert out.read_text() == ""  # still written: a pipeline's next stage reads it


@pytest.mark.parametrize("name", ["grpo", "model", "rollout", "logprobs", "moe"])
def test_bench_gpu_without_cuda_is_one_line(name):
    """bench_grpo, bench_model and bench_rollout --gpu ended in an AssertionError traceback from torch."""
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    r = run("bench", name, "--gpu")
    assert r.returncode != 0 and "torch sees no CUDA device" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_generate_several_greedy_samples_is_refused():
    """--n 3 at the default temperature 0 printed three identical completions."""
    assert "GenerateConfig.n: > 1 needs --temperature > 0" in fails("generate", "--n", "3")


def test_warmup_longer_than_the_run_is_noted(tmp_path, capsys):
    """`sft --steps 2` with the default 50 warmup steps trained at 2-4% of lr, without a word."""
    main(["sft", "--out_dir", str(tmp_path), "--steps", "2", "--num_examples", "8", "--batch_size", "4"])
    assert "note: warmup_steps (50) >= steps (2)" in capsys.readouterr().out


def test_threads_take_an_equals_sign_and_repeat():
    """`--threads=1` was "unknown command '--threads=1'" before the command and "unrecognized arguments"
    after it; a repeated --threads was an unknown command too."""
    import torch
    n = torch.get_num_threads()
    try:
        for argv in (["--threads=1", "generate", "--help"], ["generate", "--threads=1", "--help"],
                     ["--threads", "2", "--threads=1", "generate", "--help"]):
            torch.set_num_threads(2)
            with pytest.raises(SystemExit) as e:
                main(argv)
            assert e.value.code in (0, None) and torch.get_num_threads() == 1, argv
        with pytest.raises(SystemExit, match="--threads needs a positive integer, got 'x'"):
            main(["--threads=x", "generate"])
    finally:
        torch.set_num_threads(n)


def test_help_leaves_out_what_the_pipeline_sets(capsys):
    """`reasonrl train --help` listed --sft.out_dir (default 'runs/sft') and --grpo.seed, which the run
    refuses (it sets them itself: runs/train/sft)."""
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "--sft.out_dir" not in out and "--grpo.seed" not in out and "--grpo.model" not in out
    assert "--sft.lr" in out and "--sft.model" in out and "--control_lr" in out
    with pytest.raises(SystemExit):
        main(["train", "--stages", "all", "--help"])
    out = capsys.readouterr().out
    assert "--sample.out " not in out and "--rs_sft.out_dir" not in out and "--mt_grpo.seed" not in out
    assert "--sample.n " in out and "--rs_sft.lr" in out
    assert "DEFAULT_RUN.md" not in out  # a file the package does not have
