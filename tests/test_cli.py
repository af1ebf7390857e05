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


@pytest.mark.parametrize("cmd", ["sample", "eval"])
def test_unfinished_commands_fail_loudly(cmd, capsys):
    assert fails(cmd) == "2"
    assert "not implemented yet" in capsys.readouterr().err


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


def test_convert_gguf_errors_cleanly(tmp_path):
    assert "convert-gguf" in fails("convert-gguf", str(tmp_path / "missing.gguf"), "--out", str(tmp_path / "out"))
