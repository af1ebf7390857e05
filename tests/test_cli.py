"""The reasonrl console script: help lists every field with its default, errors name the field,
unfinished commands fail loudly, generate and bench run."""
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
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "--sft.steps" in out and "--grpo.max_seconds" in out and "(default: 330.0)" in out


def test_top_level_help(capsys):
    main([])
    assert "reasonrl train" in capsys.readouterr().out


def test_bad_values_name_the_field():
    r = run("grpo", "--group_size", "1")
    assert r.returncode != 0 and "GRPOConfig.group_size" in r.stderr
    r = run("train", "--sft.lr", "-1")
    assert r.returncode != 0 and "SFTConfig.lr" in r.stderr
    r = run("sft", "--steps", "x")
    assert r.returncode != 0 and "--steps" in r.stderr
    r = run("frobnicate")
    assert r.returncode != 0 and "unknown command" in r.stderr


@pytest.mark.parametrize("cmd", ["sample", "eval"])
def test_unfinished_commands_fail_loudly(cmd):
    r = run(cmd)
    assert r.returncode == 2 and "not implemented yet" in r.stderr


def test_generate_runs():
    r = run("generate", "--threads", "1", "--num", "2", "--max_tokens", "5")
    assert r.returncode == 0, r.stderr
    assert len([x for x in r.stdout.splitlines() if "->" in x]) == 2


def test_bench_lists_and_rejects(capsys):
    if not os.path.isdir(benchmarks_dir()):
        pytest.skip("no benchmarks folder next to the package")
    main(["bench"])
    assert "benchmarks in" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="unknown benchmark"):
        main(["bench", "no_such_bench"])


def test_convert_gguf_errors_cleanly(tmp_path):
    r = run("convert-gguf", str(tmp_path / "missing.gguf"), "--out", str(tmp_path / "out"))
    assert r.returncode != 0 and "convert-gguf" in r.stderr and "Traceback" not in r.stderr
