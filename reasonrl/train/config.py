"""Run configs: dataclasses with __post_init__ checks, settable from the command line and TOML.

Precedence: dataclass defaults < the TOML file (--config run.toml; nested tables for nested
configs, e.g. [grpo]) < command-line flags (`--grpo.lr 1e-4`; a leaf name alone, `--lr`, works
when it is unambiguous). `build_parser` puts every field with its default in --help.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import io
import math
import re
import sys
import textwrap
import tokenize
try:
    import tomllib
except ImportError:  # Python 3.10: the same parser as a package (pyproject's tomli)
    import tomli as tomllib
import typing
from dataclasses import dataclass, field


def _bad(cfg, name, why):
    raise ValueError(f"{type(cfg).__name__}.{name}: {why}, got {getattr(cfg, name)!r}")


# reasonrl.ops.logprobs.MIN_TEMPERATURE (not imported here: `--help` loads no torch)
_MIN_TEMPERATURE = 1e-5

_F32_MAX = 3.4028234663852886e38

# float fields where +inf has a meaning ("no limit"); NaN never has one
_INF_OK = ("max_seconds",)


def _check_floats(c):
    """Every float field a finite number (+inf only where it means "no limit", _INF_OK): an inf
    lr or temperature passed the range checks and trained to non-finite weights, exit status 0."""
    for f in dataclasses.fields(c):
        v = getattr(c, f.name)
        if isinstance(v, float) and not math.isfinite(v) and not (v > 0 and f.name in _INF_OK):
            _bad(c, f.name, "must be a finite number")
        if isinstance(v, float) and math.isfinite(v) and abs(v) > _F32_MAX:  # e.g. beta 1e300 gave NaN losses
            _bad(c, f.name, "must be within float32's range (|x| <= 3.4e38): it becomes a float32 tensor")


_SENTINEL = "reasonrlQuestionSentinel"  # plain letters: {question!r} keeps it too


def _check_template(c, name="prompt_template"):
    """The prompt template must be a str.format template whose only field is {question} (a conversion
    or format spec is fine: {question!r}), and the question must reach the prompt: "{{question}}" is
    the literal text, the question never appears."""
    t = getattr(c, name)
    try:
        filled = t.format(question=_SENTINEL)
    except KeyError as e:
        _bad(c, name, f"unknown placeholder {{{e.args[0]}}} (only {{question}} is filled; write {{{{ }}}} "
                      "for a literal brace)")
    except (IndexError, ValueError, AttributeError, TypeError) as e:
        _bad(c, name, f"not a valid format string ({e}; only {{question}} is filled, write {{{{ }}}} for a "
                      "literal brace)")
    if _SENTINEL not in filled:
        _bad(c, name, "must contain {question}" + (" as a placeholder (it was escaped or formatted away)"
                                                   if "question" in t else ""))


def _check_optim(c):
    """Checks shared by the stages' optimizer fields."""
    _check_floats(c)
    if not c.lr > 0:
        _bad(c, "lr", "must be > 0")
    if c.warmup_steps < 0:
        _bad(c, "warmup_steps", "must be >= 0")
    if not 0 <= c.min_lr_ratio <= 1:
        _bad(c, "min_lr_ratio", "must be in [0, 1]")
    if not c.weight_decay >= 0:
        _bad(c, "weight_decay", "must be >= 0")
    if not c.grad_clip >= 0:
        _bad(c, "grad_clip", "must be >= 0 (0 = no clipping)")
    if c.steps < 1:
        _bad(c, "steps", "must be >= 1")
    if not c.max_seconds >= 0:
        _bad(c, "max_seconds", "must be >= 0 (0 = no wall-clock limit)")
    if c.log_every < 1:
        _bad(c, "log_every", "must be >= 1")
    if c.save_every < 0:
        _bad(c, "save_every", "must be >= 0 (0 = only at the end and on Ctrl-C)")
    if c.keep_checkpoints < 0:
        _bad(c, "keep_checkpoints", "must be >= 0 (0 = keep all)")
    if c.precision not in PRECISIONS:
        _bad(c, "precision", f"must be one of {PRECISIONS}")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", c.device):
        _bad(c, "device", "must be auto, cpu, cuda or cuda:N")


PRECISIONS = ("auto", "fp32", "bf16")  # auto: bf16 autocast on CUDA, float32 on CPU (common.autocast)


@dataclass
class SFTConfig:
    """Cold-start SFT: cross-entropy on the response tokens of worked examples."""
    model: str = "tiny"            # "tiny" (built-in, random init), or a local Hugging Face folder
    task: str = "multiply"         # multiply | add | countdown | jsonl:PATH | rg:DATASET | a mix "multiply=0.7;add=0.3"
    difficulty: int | None = None  # the task's knob (None = the task's default)
    num_examples: int = 500        # size of the fixed cold-start set
    steps: int = 2000
    max_seconds: float = 0.0       # wall-clock budget of the stage (0 = steps only)
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1      # cosine decays to lr * min_lr_ratio at `steps`
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    precision: str = "auto"        # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16 (autocast; fp32 weights)
    device: str = "auto"           # auto (the GPU when torch sees one, else the CPU) | cpu | cuda | cuda:N
    keep_logits_mib: int = 256     # LM-head logits of a batch up to this size kept for backward (0: recompute)
    prompt_template: str = "{question}\n"
    seed: int = 0
    out_dir: str = "runs/sft"
    log_every: int = 10
    save_every: int = 0
    keep_checkpoints: int = 2      # step checkpoints kept in out_dir (0 = all: curves over training)
    resume: bool = False

    def __post_init__(self):
        _check_optim(self)
        if self.num_examples < 1:
            _bad(self, "num_examples", "must be >= 1")
        if self.batch_size < 1:
            _bad(self, "batch_size", "must be >= 1")
        if self.keep_logits_mib < 0:
            _bad(self, "keep_logits_mib", "must be >= 0 (0: always recompute the logits in backward)")
        _check_template(self)
        if "=" in self.task:
            _check_mix(self, "task", rewards=False)


def _check_mix(cfg, name, rewards=True):
    """Validate a task mix field (rl.tasks.parse_task_mix syntax); errors name the field."""
    from reasonrl.rl.rewards import parse_reward_spec
    from reasonrl.rl.tasks import parse_task_mix
    try:
        for _, _, spec in parse_task_mix(getattr(cfg, name)):
            if spec is not None and not rewards:
                raise ValueError("per-task rewards ('|REWARDS') only apply to GRPO")
            if spec is not None:
                parse_reward_spec(spec)
    except (ValueError, ImportError) as e:
        _bad(cfg, name, str(e))


def _check_backend(cfg):
    """The loss backend must run on the run's device (ops/_backend.why_unavailable): an unavailable
    one (triton or cuda on a CPU-only machine) failed only after the first rollout, or never when
    every group was dropped. A device torch cannot see is left to common.resolve_device, which
    refuses it before any work."""
    if cfg.backend == "auto":
        return
    import torch

    from reasonrl.ops._backend import why_unavailable
    if cfg.device == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        dev = torch.device(cfg.device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            return
    reason = why_unavailable(cfg.backend, dev)
    if reason is not None:
        _bad(cfg, "backend", f"cannot run on device {str(dev)!r} ({reason}); use 'auto' or a backend "
                             f"available there (device: {cfg.device!r})")


@dataclass
class GRPOConfig:
    """GRPO: rollouts from the engine, verified rewards, grpo_loss, AdamW."""
    model: str = "tiny"            # a folder (e.g. the SFT stage's out_dir/final) or "tiny"
    task: str = "multiply"         # multiply | add | countdown | jsonl:PATH | rg:DATASET
    tasks: str = ""                # multi-task mix "TASK=WEIGHT[|REWARDS];..." (rl/tasks.py parse_task_mix); "" = task
    difficulty: int | None = None  # the task's knob (None = the task's default)
    steps: int = 200               # optimizer steps (the cosine schedule's length)
    max_seconds: float = 0.0       # wall-clock budget of the stage (0 = steps only)
    prompts_per_step: int = 16     # groups per step (after dynamic sampling)
    group_size: int = 8            # G samples per prompt
    temperature: float = 1.0       # sampling temperature, also applied to the loss's log-probs
    top_p: float = 1.0             # nucleus sampling in rollouts
    max_tokens: int = 64           # completion length cap; longer completions are truncated
    rewards: str = "accuracy:1.0,format:0.1"  # name, rm:FOLDER (reward model) or pkg.module:function, with :weight
    dynamic_sampling: bool = True  # drop zero-variance groups and refill the batch
    filter_on: str = "accuracy"    # variance of what decides a group is dropped: accuracy | reward
    max_refills: int = 2           # extra rollout rounds per step when refilling
    truncation: str = "mask"       # mask | penalize | keep: what happens to truncated completions
    truncation_reward: float = 0.0  # their reward under "penalize"
    mu: int = 1                    # optimizer passes over each batch (> 1: old log-probs are needed)
    micro_batch_tokens: int = 8192  # token budget of one forward/backward
    share_prefix: bool = True      # pack each group's prompt once in training (same gradients, less work)
    lr: float = 1e-4
    warmup_steps: int = 5
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    beta: float = 0.0              # KL to a frozen reference model (0: no reference model)
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    loss_type: str = "dapo"        # token-level mean (benchmarks/RESULTS.md); grpo | bnpo | dapo | dr_grpo
    advantage: str = "grpo"        # grpo | dr_grpo | rloo
    backend: str = "auto"          # grpo_loss backend: auto | reference | triton | cpp | cuda
    precision: str = "auto"        # training forward: auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16
    device: str = "auto"           # auto (the GPU when torch sees one, else the CPU) | cpu | cuda | cuda:N
    rollout_dtype: str = "weights"  # weights (the engine runs on them: no copy) | bf16 (a bf16 cast per rollout)
    prompt_template: str = "{question}\n"
    seed: int = 0
    out_dir: str = "runs/grpo"
    log_every: int = 1
    save_every: int = 0
    keep_checkpoints: int = 2      # step checkpoints kept in out_dir (0 = all: curves over training)
    resume: bool = False

    def __post_init__(self):
        _check_optim(self)
        if self.prompts_per_step < 1:
            _bad(self, "prompts_per_step", "must be >= 1")
        if self.group_size < 2:
            _bad(self, "group_size", "must be >= 2 (advantages compare samples within a group)")
        if not self.temperature >= _MIN_TEMPERATURE:
            _bad(self, "temperature", f"must be >= {_MIN_TEMPERATURE} (sampling; smaller ones overflow float32)")
        if not 0 < self.top_p <= 1:
            _bad(self, "top_p", "must be in (0, 1]")
        if self.max_tokens < 1:
            _bad(self, "max_tokens", "must be >= 1")
        if self.truncation not in ("mask", "penalize", "keep"):
            _bad(self, "truncation", "must be mask | penalize | keep")
        if self.mu < 1:
            _bad(self, "mu", "must be >= 1")
        if self.filter_on not in ("accuracy", "reward"):
            _bad(self, "filter_on", "must be accuracy | reward")
        if self.max_refills < 0:
            _bad(self, "max_refills", "must be >= 0")
        if self.micro_batch_tokens < 1:
            _bad(self, "micro_batch_tokens", "must be >= 1")
        if not self.beta >= 0:
            _bad(self, "beta", "must be >= 0")
        if not 0 <= self.epsilon_low < 1:
            _bad(self, "epsilon_low", "must be in [0, 1)")
        if not self.epsilon_high >= 0:
            _bad(self, "epsilon_high", "must be >= 0")
        _check_template(self)
        from reasonrl.ops.grpo import ADVANTAGES, LOSS_TYPES
        if self.loss_type not in LOSS_TYPES:
            _bad(self, "loss_type", f"must be one of {LOSS_TYPES}")
        if self.advantage not in ADVANTAGES:
            _bad(self, "advantage", f"must be one of {ADVANTAGES}")
        if self.rollout_dtype not in ("weights", "bf16"):
            _bad(self, "rollout_dtype", "must be 'weights' or 'bf16'")
        from reasonrl.ops._backend import BACKENDS
        if self.backend not in BACKENDS:
            _bad(self, "backend", f"must be one of {BACKENDS}")
        _check_backend(self)
        from reasonrl.rl.rewards import parse_reward_spec
        parse_reward_spec(self.rewards)  # raises naming the bad reward
        if self.tasks:
            _check_mix(self, "tasks")


@dataclass
class TrainConfig:
    """The whole pipeline (`reasonrl train`): cold-start SFT, then GRPO beside a fair SFT control,
    then held-out accuracy of the three. Stage lengths: steps, and max_seconds wall-clock budgets.
    The full R1 pipeline (SFT -> GRPO -> rejection sampling + SFT -> multi-task GRPO, resumable) is
    selected by a `stages` field: `reasonrl train --stages all --help` lists its fields, and
    reasonrl/train/r1_small.toml is a small example (`reasonrl train --config .../r1_small.toml`)."""
    # SFT by steps (about 300-320 s on an idle 2-core CPU): a loaded machine must not shorten the cold
    # start (fewer steps left GRPO without a plateaued start: benchmarks/RESULTS.md). GRPO and the control
    # share one wall-clock budget, which keeps the comparison fair under any load.
    # On the CPU even where a GPU is (`--sft.device auto --grpo.device auto` to move it): the run and
    # its wall-clock budgets were measured there, and the 0.9M-parameter model gains nothing on a GPU.
    sft: SFTConfig = field(default_factory=lambda: SFTConfig(steps=950, device="cpu"))
    # GRPO step checkpoints every 50 steps, all kept: `reasonrl eval` on runs/train/grpo draws its
    # curves over training from them (about 10 MB each for the tiny model)
    grpo: GRPOConfig = field(default_factory=lambda: GRPOConfig(steps=10_000, max_seconds=240.0, save_every=50,
                                                                 keep_checkpoints=0, device="cpu"))
    control_lr: float = 2e-4       # lr of the SFT control (best at 1e-4 to 3e-4: benchmarks/RESULTS.md)
    control: bool = True           # run the SFT control for the GRPO stage's wall time
    eval_problems: int = 500       # held-out problems (never trained on), greedy decoding
    seed: int = 0
    out_dir: str = "runs/train"
    # the control, budgeted by GRPO's wall time, runs again from the SFT weights on --resume
    resume: bool = False           # continue an interrupted run: SFT and GRPO from their latest checkpoints

    # fields pipeline.run_train sets itself (refuse_overridden): left out of --help
    SET_BY_PIPELINE: typing.ClassVar[frozenset] = frozenset({"sft.seed", "grpo.seed", "sft.out_dir", "grpo.out_dir",
                                                             "grpo.model"})

    def __post_init__(self):
        _check_floats(self)
        if not self.control_lr > 0:
            _bad(self, "control_lr", "must be > 0")
        if self.eval_problems < 1:
            _bad(self, "eval_problems", "must be >= 1")

    def refuse_overridden(self):
        """The command line's check (the Python API may pass whole stage configs): fields that
        pipeline.run_train sets itself, which a flag would set for nothing."""
        for stage, name, instead in (("sft", "seed", "seed"), ("grpo", "seed", "seed"), ("sft", "out_dir", "out_dir"),
                                     ("grpo", "out_dir", "out_dir"), ("grpo", "model", "sft.model")):
            sub = getattr(self, stage)
            if getattr(sub, name) != getattr(type(sub)(), name):
                raise ValueError(f"TrainConfig.{stage}.{name}: `reasonrl train` sets it itself (from its "
                                 f"{'SFT stage' if name == 'model' else repr(name)}); set --{instead} instead, "
                                 f"got {getattr(sub, name)!r}")
        return self


STAGES = ("sft", "grpo", "sample", "rs_sft", "mt_grpo")


@dataclass
class SampleConfig:
    """Rejection sampling: n samples per training-split prompt, keep the verified-correct ones."""
    model: str = "tiny"            # a model folder (e.g. runs/train/grpo/final), or a built-in name
    task: str = "multiply"
    difficulty: int | None = None
    num_prompts: int = 512         # training-split prompts
    n: int = 8                     # samples per prompt
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 64
    shortest: bool = False         # keep only the shortest correct response per prompt
    require_format: bool = True    # also require the exact <think>..</think><answer>..</answer> format
    chunk_prompts: int = 64        # prompts per engine call (one progress-bar tick)
    prompt_template: str = "{question}\n"
    seed: int = 0
    out: str = "runs/sample/samples.jsonl"

    def __post_init__(self):
        _check_floats(self)
        for name in ("num_prompts", "n", "max_tokens", "chunk_prompts"):
            if getattr(self, name) < 1:
                _bad(self, name, "must be >= 1")
        if not self.temperature >= _MIN_TEMPERATURE:
            _bad(self, "temperature", f"must be >= {_MIN_TEMPERATURE} (n different samples per prompt; smaller "
                 "ones overflow float32)")
        if not 0 < self.top_p <= 1:
            _bad(self, "top_p", "must be in (0, 1]")
        if not self.out.endswith(".jsonl"):
            _bad(self, "out", "must be a .jsonl path")
        _check_template(self)


@dataclass
class PipelineConfig:
    """The whole R1 pipeline (`reasonrl train --stages ...`, or `--config FILE.toml` with `stages`,
    e.g. reasonrl/train/r1_small.toml):
    cold-start SFT -> GRPO -> rejection sampling -> SFT on the kept samples -> multi-task GRPO.
    Each stage starts from the previous stage's final model (a stage's own `model` field is used
    only when no earlier stage made one); --resume skips finished stages and resumes the
    interrupted one from its latest checkpoint."""
    stages: str = "sft,grpo,sample,rs_sft,mt_grpo"  # a subsequence of that order
    # fields r1.stage_config always sets itself (refuse_overridden): left out of --help
    SET_BY_PIPELINE: typing.ClassVar[frozenset] = frozenset(
        [f"{s}.{f}" for s in ("sft", "grpo", "sample", "rs_sft", "mt_grpo") for f in ("seed", "out_dir", "resume")]
        + ["sample.out"])
    # the cold start covers every task of the multi-task stage (a task never seen gets no reward signal)
    sft: SFTConfig = field(default_factory=lambda: SFTConfig(task="multiply=0.7;add=0.3", max_seconds=330.0))
    # GRPO step checkpoints every 50 steps, all kept: `reasonrl eval` on runs/train/grpo draws its
    # curves over training from them (about 10 MB each for the tiny model)
    grpo: GRPOConfig = field(default_factory=lambda: GRPOConfig(steps=10_000, max_seconds=240.0, save_every=50,
                                                                 keep_checkpoints=0))
    sample: SampleConfig = field(default_factory=lambda: SampleConfig(shortest=True))
    rs_sft: SFTConfig = field(default_factory=lambda: SFTConfig(steps=300, lr=2e-4, warmup_steps=10))
    mt_grpo: GRPOConfig = field(default_factory=lambda: GRPOConfig(tasks="multiply=0.7;add=0.3", steps=100))
    eval_tasks: str = ""           # comma-separated held-out task sets; "" = grpo.task plus mt_grpo's tasks
    eval_problems: int = 200       # held-out problems per eval task, greedy
    stop_after: str = ""           # stop after this stage (a stage limit; --resume continues)
    seed: int = 0
    out_dir: str = "runs/pipeline"
    resume: bool = False

    def __post_init__(self):
        if self.stages.strip() == "all":
            self.stages = ",".join(STAGES)
        names = [s.strip() for s in self.stages.split(",") if s.strip()]
        unknown = [s for s in names if s not in STAGES]
        if unknown or not names:
            _bad(self, "stages", f"unknown stage(s) {unknown} (stages: {', '.join(STAGES)})" if unknown
                 else "no stages given")
        if names != sorted(set(names), key=STAGES.index):
            _bad(self, "stages", f"must be a subsequence of {','.join(STAGES)} with no repeats")
        if self.stop_after and self.stop_after not in names:
            _bad(self, "stop_after", f"must be one of the run's stages {names}")
        if self.eval_problems < 0:
            _bad(self, "eval_problems", "must be >= 0 (0 = no evaluation)")
        from reasonrl.rl.tasks import get_task
        for t in self.eval_task_list():
            try:
                get_task(t)
            except (ValueError, ImportError) as e:
                _bad(self, "eval_tasks", str(e))

    def stage_list(self) -> list[str]:
        return [s.strip() for s in self.stages.split(",") if s.strip()]

    def refuse_overridden(self):
        """The command line's check, as TrainConfig's: fields of the run's stages that r1.stage_config
        sets itself, which a flag or the TOML would set for nothing (they were ignored silently)."""
        names = self.stage_list()
        for i, stage in enumerate(names):
            sub, default = getattr(self, stage), type(self).__dataclass_fields__[stage].default_factory()
            fields = [("seed", "set --seed")]
            if i:
                fields.append(("model", f"set --{names[0]}.model: later stages start from the stage before"))
            if stage == "sample":
                fields.append(("out", "it writes OUT_DIR/sample/samples.jsonl; set --out_dir"))
            else:
                fields += [("out_dir", f"it writes OUT_DIR/{stage}; set --out_dir"), ("resume", "set --resume")]
            if stage == "rs_sft" and "sample" in names:
                fields += [("task", "it trains on the sample stage's output"),
                           ("num_examples", "it trains on every sample kept")]
            for name, hint in fields:
                if getattr(sub, name) != getattr(default, name):
                    raise ValueError(f"PipelineConfig.{stage}.{name}: the pipeline sets it itself ({hint}), "
                                     f"got {getattr(sub, name)!r}")
        return self

    def eval_task_list(self) -> list[str]:
        if self.eval_tasks:
            return [t.strip() for t in self.eval_tasks.split(",") if t.strip()]
        from reasonrl.rl.tasks import parse_task_mix
        mix = [n for n, _, _ in parse_task_mix(self.mt_grpo.tasks)] if self.mt_grpo.tasks else []
        return list(dict.fromkeys([self.grpo.task] + mix))


@dataclass
class DistillConfig:
    """Distillation: the teacher's verified-correct traces + the cold-start set train a smaller
    student by SFT, beside the same student trained for the same steps on the cold-start set alone."""
    teacher: str = "runs/train/grpo/final"  # the default run's GRPO model
    student: str = "tiny-s"        # built-in name (random init) or a model folder
    task: str = "multiply"
    difficulty: int | None = None
    num_examples: int = 500        # the cold-start set (both students see it; same seed as `reasonrl train`)
    teacher_prompts: int = 2000    # training-split prompts the teacher answers (cold-start questions excluded)
    samples_per_prompt: int = 4
    temperature: float = 1.0
    shortest: bool = True
    steps: int = 1500              # SFT steps of each student
    batch_size: int = 64
    lr: float = 2e-3
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    max_tokens: int = 64
    eval_problems: int = 500       # held-out problems, greedy
    seed: int = 0
    out_dir: str = "runs/distill"

    def __post_init__(self):
        _check_floats(self)
        for name in ("num_examples", "teacher_prompts", "samples_per_prompt", "steps", "batch_size",
                     "max_tokens", "eval_problems"):
            if getattr(self, name) < 1:
                _bad(self, name, "must be >= 1")
        if not self.lr > 0:
            _bad(self, "lr", "must be > 0")
        if self.warmup_steps < 0:
            _bad(self, "warmup_steps", "must be >= 0")
        if not 0 <= self.min_lr_ratio <= 1:
            _bad(self, "min_lr_ratio", "must be in [0, 1]")
        if not self.temperature >= _MIN_TEMPERATURE:
            _bad(self, "temperature", f"must be >= {_MIN_TEMPERATURE} (smaller ones overflow float32)")


@dataclass
class GenerateConfig:
    """Sample completions from a model for a few prompts (or a task's held-out problems)."""
    model: str = "tiny"
    prompt: str = ""               # one prompt; empty: `num` held-out problems of `task`
    task: str = "multiply"
    num: int = 4
    n: int = 1                     # samples per prompt
    temperature: float = 0.0
    max_tokens: int = 64
    prompt_template: str = "{question}\n"
    seed: int = 0

    def __post_init__(self):
        _check_floats(self)
        if self.num < 1:
            _bad(self, "num", "must be >= 1")
        if self.n < 1:
            _bad(self, "n", "must be >= 1")
        if not (self.temperature == 0 or self.temperature >= _MIN_TEMPERATURE):
            _bad(self, "temperature", f"must be 0 (greedy) or >= {_MIN_TEMPERATURE} (smaller ones overflow float32)")
        if self.n > 1 and self.temperature == 0:  # printed n identical completions
            _bad(self, "n", "> 1 needs --temperature > 0 (greedy samples are identical)")
        if self.max_tokens < 1:
            _bad(self, "max_tokens", "must be >= 1")
        _check_template(self)


# ---------------------------------------------------------------------------------------- parsing
@functools.lru_cache(maxsize=None)
def _field_comments(cls) -> dict[str, str]:
    """{field: the comment at the end of its line in the class body} (the --help text)."""
    try:
        src = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    out, line_name = {}, {}
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        row, col = tok.start
        if tok.type == tokenize.NAME and col == 4 and row not in line_name:
            line_name[row] = tok.string
        elif tok.type == tokenize.COMMENT and row in line_name:
            out[line_name[row]] = tok.string.lstrip("#").strip()
    return out


def _field_help(cls, dotted: str) -> str:
    *path, last = dotted.split(".")
    for part in path:
        cls = typing.get_type_hints(cls)[part]
    return _field_comments(cls).get(last, "")


def _leaves(cls, prefix=""):
    """(dotted name, field, type) for every non-dataclass field, nested ones flattened."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            yield from _leaves(t, prefix + f.name + ".")
        else:
            yield prefix + f.name, f, t


def _convert(t, text: str, name: str):
    """Command-line text -> a value of type t (int, float, str, bool, X | None)."""
    args = typing.get_args(t)
    if type(None) in args:
        if text.lower() in ("none", "null", ""):
            return None
        t = next(a for a in args if a is not type(None))
    if t is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"--{name}: expected true or false, got {text!r}")
    try:
        return t(text)
    except ValueError:
        raise ValueError(f"--{name}: expected {t.__name__}, got {text!r}") from None


def _default_of(cls, dotted):
    obj = cls()
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def build_parser(cls, prog: str, description: str = "") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description or (cls.__doc__ or "").strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="TOML", help="a TOML file of field values (flags override it)")
    leaves = list(_leaves(cls))
    counts: dict[str, int] = {}
    for name, _, _ in leaves:
        counts[name.rsplit(".", 1)[-1]] = counts.get(name.rsplit(".", 1)[-1], 0) + 1
    for name, f, t in leaves:
        flags = ["--" + name]
        short = name.rsplit(".", 1)[-1]
        if "." in name and counts[short] == 1:
            flags.append("--" + short)
        is_bool = t is bool
        p.add_argument(*flags, dest=name, default=argparse.SUPPRESS, metavar="BOOL" if is_bool else
                       getattr(t, "__name__", str(t)).upper(), nargs="?" if is_bool else None,
                       const="true" if is_bool else None,
                       help=argparse.SUPPRESS if name in getattr(cls, "SET_BY_PIPELINE", ()) else
                       f"{_field_help(cls, name)} (default: {_default_of(cls, name)!r})".lstrip().replace("%", "%%"))
    return p


def _assign(values: dict, dotted: str, value):
    *path, last = dotted.split(".")
    for i, part in enumerate(path):
        values = values.setdefault(part, {})
        if not isinstance(values, dict):  # the TOML gave `grpo = 5`, and a flag sets grpo.lr
            table = ".".join(path[:i + 1])
            raise ValueError(f"{table} must be a table of fields ([{table}]) for --{dotted}, got "
                             f"{type(values).__name__} {values!r}")
    values[last] = value


def _type_name(t) -> str:
    args = typing.get_args(t)
    if args:
        return " or ".join("none" if a is type(None) else _type_name(a) for a in args)
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(t, getattr(t, "__name__", str(t)))


def _typed(t, v, default):
    """(ok, value): v checked against a field's annotation t (int: an int, not a bool; float: an int
    or float, not a bool, made a float; bool: a bool; str: a str; X | None: None too, as does a
    None default)."""
    args = typing.get_args(t)
    if args:  # X | None
        if v is None:
            return type(None) in args, v
        for a in (a for a in args if a is not type(None)):
            ok, out = _typed(a, v, default)
            if ok:
                return True, out
        return False, v
    if v is None:
        return default is None, v
    if t is bool:
        return isinstance(v, bool), v
    if t is int:  # 64 bits: seeds and counts become int64 (a larger seed failed deep in torch)
        return isinstance(v, int) and not isinstance(v, bool) and -2 ** 63 <= v < 2 ** 63, v
    if t is float:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool)
        try:
            return ok, float(v) if ok else v
        except OverflowError:  # an int past float's range (TOML `lr = 1000...0`)
            return False, v
    if t is str:
        return isinstance(v, str), v
    return (isinstance(v, t) if isinstance(t, type) else True), v  # no other field types today


def _field_default(f):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _from_dict(cls, d: dict, where: str, table: str = ""):
    """cls(**d) with every value checked against its field's type; errors name the file (`where`),
    the table and the key. Command-line values arrive already converted (_convert) and pass."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    at = f"[{table}] " if table else ""
    kwargs = {}
    for k, v in d.items():
        if k not in fields:
            raise ValueError(f"{where}: {at}unknown field {k!r} for {cls.__name__} (fields: {sorted(fields)})")
        t = hints[k]
        if dataclasses.is_dataclass(t):
            if not isinstance(v, dict):
                raise ValueError(f"{where}: field {k!r} must be a table of {t.__name__} fields "
                                 f"([{table + '.' if table else ''}{k}]), got {type(v).__name__} {v!r}")
            base = dataclasses.asdict(_field_default(fields[k]))
            base.update(v)
            kwargs[k] = _from_dict(t, base, where, f"{table}.{k}" if table else k)
        else:
            ok, value = _typed(t, v, _field_default(fields[k]))
            if not ok:
                shown = str(v).lower() if isinstance(v, bool) else repr(v)  # as TOML spells it
                if len(shown) > 60:
                    shown = shown[:30] + f"...({len(shown)} characters)"
                got = "an integer out of range" if type(v) is int else type(v).__name__
                raise ValueError(f"{where}: {at}{k} = {shown}: expected {_type_name(t)} ({cls.__name__}.{k}), "
                                 f"got {got}")
            kwargs[k] = value
    if not table:
        return cls(**kwargs)
    try:
        return cls(**kwargs)
    except ValueError as e:  # a nested stage's check: say which stage (SFTConfig.lr could be sft's or rs_sft's)
        raise ValueError(f"{where + ': ' if where != 'config' else ''}[{table}] {e}") from None


# argparse (3.11) takes "-1e-4" and "-inf" for options, not values: "--lr -1e-4" failed with "expected one
# argument". A flag followed by such a number is joined into "--lr=-1e-4" first.
_NEG_NUMBER = re.compile(r"-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|-inf(inity)?|-nan", re.IGNORECASE)


def parse_config(cls, argv: list[str] | None, prog: str = "reasonrl"):
    """A `cls` instance from defaults, an optional TOML file and command-line flags."""
    argv, joined = list(sys.argv[1:] if argv is None else argv), []
    while argv:
        a = argv.pop(0)
        if a.startswith("--") and "=" not in a and argv and _NEG_NUMBER.fullmatch(argv[0]):
            a += "=" + argv.pop(0)
        joined.append(a)
    args = build_parser(cls, prog).parse_args(joined)
    values: dict = {}
    if args.config:
        with open(args.config, "rb") as f:
            try:
                values = tomllib.load(f)
            except tomllib.TOMLDecodeError as e:
                raise ValueError(f"{args.config}: invalid TOML: {e}") from None
    types = {name: t for name, _, t in _leaves(cls)}
    for name, text in vars(args).items():
        if name != "config":
            try:
                _assign(values, name, _convert(types[name], text, name))
            except ValueError as e:
                raise ValueError(f"{args.config}: {e}" if args.config and "table" in str(e) else str(e)) from None
    return _from_dict(cls, values, args.config or "config")


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
