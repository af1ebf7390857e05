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
    assert len([x for x in capsys.readouterr().out.splitlines() if "->" in x]) == 2


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
    finally:
        torch.set_num_threads(n)


def test_convert_gguf_errors_cleanly(tmp_path):
    assert "convert-gguf" in fails("convert-gguf", str(tmp_path / "missing.gguf"), "--out", str(tmp_path / "out"))
