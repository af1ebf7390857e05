"""`reasonrl eval`: what RL did to reasoning, measured at test time on held-out problems.

For each model (a checkpoint folder, "tiny", or a run folder whose step-*/ checkpoints and final/
are evaluated in training order) on the task's held-out split:
- passk: n samples per problem at `temperature`: pass@1, pass@k (unbiased), maj@k (metrics.py);
- budget: accuracy against thinking tokens. Thinking capped at each of `budgets` (the engine forces
  "</think>" and the answer follows), the model's own length ("natural"), and thinking extended
  `extends` times by replacing the model's "</think>" with "Wait" (s1's budget forcing). The x axis
  is measured, not requested: the tokens actually inside <think>...</think> of each completion.
  The engine caps each thinking span: a model that opens <think> again after the forced answer
  starts a new one, so a measured mean can pass its budget a little (8.08 at budget 8, SFT check);
- difficulty: accuracy, response length and thinking tokens at each of `difficulties`;
- markers: self-verification / backtracking words per response and per 1k tokens, from the passk
  samples (natural generation: the forced "Wait"s of the budget section would inflate them).
Every request carries SamplingParams.seed = seed: the same seed gives the same JSON, and all
models and settings draw the same random numbers (common random numbers: differences between
them are less noisy). The engine seeds sample j of a request by (seed, j) alone, so sample j of
every problem draws the same uniforms: estimates stay unbiased, their noise across problems is
somewhat correlated. One LLMEngine.generate call per (model, setting), over all problems x samples.
NOTE: 100 problems x 8 samples (28.9k tokens, a 0.8M-parameter SFT checkpoint, 1 thread on the
busy 2-core CPU machine, 2026-11-26): one generate call 6.5-7.7 s, one call per problem 25.6-31.3 s.
Output: out_dir/eval.json, summary.md (the printed table), samples.jsonl (every completion) and
passk/budget/difficulty/markers.png, one curve per model.

Regenerate the README curves from a default run's output folder (runs/train):

    reasonrl eval --models runs/train/sft/final,runs/train/grpo,runs/train/control/final \\
        --labels sft,grpo,control --out_dir runs/eval/default

(runs/train/grpo is a run folder: its saved step checkpoints, if any besides the last, become
extra points "grpo@step-N" of response length against difficulty over training.)
"""
from __future__ import annotations

import dataclasses
import filecmp
import json
import math
import os
import re
from dataclasses import dataclass

import torch

from reasonrl.engine.llm_engine import opens_think
from reasonrl.eval.metrics import DEFAULT_MARKERS, maj_at_k, marker_counts, pass_at_k, think_spans
from reasonrl.ops.logprobs import MIN_TEMPERATURE
from reasonrl.rl.rewards import answers_equal
from reasonrl.train.checkpoint import write_text_atomic
from reasonrl.train.common import BUILTIN_MODELS

SECTIONS = ("passk", "budget", "difficulty", "markers")


@dataclass
class EvalConfig:
    """Test-time-compute evaluation: pass@k / maj@k, accuracy against thinking budget, accuracy and
    length by difficulty, reasoning-marker frequencies; JSON + PNG, several models on one plot."""
    models: str = "tiny"           # comma-separated: "tiny", model folders, or run folders (step-*/ + final/)
    labels: str = ""               # comma-separated, one per --models entry (default: folder names)
    task: str = "multiply"         # multiply | add | countdown | jsonl:PATH | rg:DATASET
    difficulty: int | None = None  # the task's knob for passk/budget/markers (None = its default)
    num_problems: int = 100        # held-out problems (test split)
    n: int = 8                     # samples per problem for pass@k / maj@k / markers
    k: str = ""                    # k values of pass@k and maj@k, each <= n ("": those of 1,4,8 up to n); pass@1 always
    temperature: float = 1.0       # sampling temperature of the passk samples
    top_p: float = 1.0
    max_tokens: int = 128          # completion cap (room for "Wait" extensions)
    budgets: str = "auto"          # thinking-token caps ("auto": those of 4,8,16,24,32 below max_tokens; "" = none)
    extends: str = "1,2"           # "Wait" extensions ("" = none)
    extend_text: str = "Wait"
    difficulties: str = "auto"     # get_task difficulty levels, built-in tasks only ("auto": 3,4,5,6 where the task has the knob; "" = skip)
    curve_temperature: float = 0.0  # budget and difficulty curves (0 = greedy)
    curve_samples: int = 1         # samples per problem for those curves (> 1 needs temperature > 0)
    markers: str = ",".join(DEFAULT_MARKERS)
    sections: str = ",".join(SECTIONS)
    prompt_template: str = "{question}\n"
    seed: int = 0
    device: str = "auto"           # auto | cpu | cuda
    batch: int = 256               # engine max_num_seqs
    plots: bool = True
    out_dir: str = "runs/eval"

    def __post_init__(self):
        def bad(name, why):
            raise ValueError(f"--{name}: {why}, got {getattr(self, name)!r}")
        self.ks, self.budget_list, self.extend_list, self.difficulty_list  # noqa: B018 (parse and check)
        for f in dataclasses.fields(self):  # inf passed the range checks below and failed in the engine
            v = getattr(self, f.name)
            if isinstance(v, float) and not math.isfinite(v):
                bad(f.name, "must be a finite number")
        if self.num_problems < 1:
            bad("num_problems", "must be >= 1")
        if self.n < 1:
            bad("n", "must be >= 1")
        if any(k > self.n for k in self.ks):
            bad("k", f"every k must be <= n={self.n} (samples per problem): give --k values up to {self.n} "
                     f"or a larger --n")
        if not self.temperature >= MIN_TEMPERATURE:
            bad("temperature", f"must be >= {MIN_TEMPERATURE} (pass@k needs different samples; smaller ones "
                               "overflow float32)")
        if not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1]")
        if self.max_tokens < 1:
            bad("max_tokens", "must be >= 1")
        if self.budget_list and max(self.budget_list) >= self.max_tokens:
            bad("budgets", f"every budget must be < max_tokens={self.max_tokens} (room for the answer)")
        if not (self.curve_temperature == 0 or self.curve_temperature >= MIN_TEMPERATURE):
            bad("curve_temperature", f"must be 0 (greedy) or >= {MIN_TEMPERATURE} (smaller ones overflow float32)")
        if self.curve_samples < 1:
            bad("curve_samples", "must be >= 1")
        if self.curve_samples > 1 and self.curve_temperature == 0:
            bad("curve_samples", "> 1 needs --curve_temperature > 0 (greedy samples are identical)")
        if not self.extend_text.strip() and self.extend_list:
            bad("extend_text", "must be non-empty")
        if self.batch < 1:
            bad("batch", "must be >= 1")
        if self.device not in ("auto", "cpu", "cuda"):
            bad("device", "must be auto | cpu | cuda")
        from reasonrl.train.config import _check_template
        _check_template(self)  # a str.format template whose one field is {question}
        unknown = set(self.section_list) - set(SECTIONS)
        if unknown or not self.section_list:
            bad("sections", f"must be a non-empty comma-separated subset of {','.join(SECTIONS)}")
        if not self.marker_list and "markers" in self.section_list:
            bad("markers", "must name at least one marker (or drop 'markers' from --sections)")

    # comma-separated fields, parsed and checked
    @property
    def ks(self) -> list[int]:
        if not self.k.strip():  # the default: 1, 4, 8 as far as n allows (--n 4 alone: 1, 4)
            return [k for k in (1, 4, 8) if k <= max(self.n, 1)]
        return sorted(set([1] + _ints(self.k, "k", lo=1)))

    @property
    def budget_list(self) -> list[int]:
        if self.budgets.strip() == "auto":  # --max_tokens 16 alone: budgets 4, 8
            return [b for b in (4, 8, 16, 24, 32) if b < self.max_tokens]
        return _ints(self.budgets, "budgets", lo=0)

    @property
    def extend_list(self) -> list[int]:
        return _ints(self.extends, "extends", lo=1)

    @property
    def difficulty_list(self) -> list[int]:
        if self.difficulties.strip() == "auto":  # a JSONL or reasoning-gym task has no knob: the section is skipped
            from reasonrl.rl.tasks import BUILTIN
            return [3, 4, 5, 6] if self.task in BUILTIN else []
        return _ints(self.difficulties, "difficulties", lo=1)

    @property
    def marker_list(self) -> list[str]:
        return [m.strip() for m in self.markers.split(",") if m.strip()]

    @property
    def section_list(self) -> list[str]:
        return [s.strip() for s in self.sections.split(",") if s.strip()]


def _ints(text: str, name: str, lo: int) -> list[int]:
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            v = int(part)
        except ValueError:
            raise ValueError(f"--{name}: expected comma-separated integers, got {text!r}") from None
        if v < lo:
            raise ValueError(f"--{name}: every value must be >= {lo}, got {v} in {text!r}")
        out.append(v)
    return sorted(set(out))


# ------------------------------------------------------------------------------------ models
def run_checkpoints(run_dir: str) -> list[tuple[str, str]]:
    """(name, folder) of a run folder's step-N checkpoints in step order, then final/. A step
    checkpoint with the same weights as final/ (the stage's last save) is left out."""
    steps = sorted((d for d in os.listdir(run_dir) if re.fullmatch(r"step-\d+", d)
                    and os.path.isfile(os.path.join(run_dir, d, "config.json"))), key=lambda d: int(d[5:]))
    out = [(f"step-{int(d[5:])}", os.path.join(run_dir, d)) for d in steps]
    final = os.path.join(run_dir, "final")
    if os.path.isfile(os.path.join(final, "config.json")):
        w = lambda d: os.path.join(d, "model.safetensors")  # noqa: E731
        out = [(n, p) for n, p in out if not (os.path.isfile(w(p)) and os.path.isfile(w(final))
                                              and filecmp.cmp(w(p), w(final), shallow=False))]
        out.append(("final", final))
    return out


def resolve_models(models: str, labels: str) -> list[tuple[str, str]]:
    """(label, spec) per model to evaluate: run folders expanded, labels checked."""
    specs = [m.strip() for m in models.split(",") if m.strip()]
    if not specs:
        raise ValueError("--models: no model given")
    names = [x.strip() for x in labels.split(",")] if labels.strip() else []
    if names and len(names) != len(specs):
        raise ValueError(f"--labels: {len(names)} labels for {len(specs)} models ({labels!r})")
    out = []
    for i, spec in enumerate(specs):
        if spec in BUILTIN_MODELS:  # (tiny-s was "no such checkpoint folder")
            out.append((names[i] if names else spec, spec))
            continue
        path = os.path.normpath(spec)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"--models: no such checkpoint folder: {spec!r}")
        full = os.path.abspath(path)  # "final" given from inside its run folder: the run's name, not ""
        base = os.path.basename(full)
        label = names[i] if names else (os.path.basename(os.path.dirname(full)) if base == "final" else base)
        if os.path.isfile(os.path.join(path, "config.json")):
            if not any(os.path.isfile(os.path.join(path, f)) for f in ("model.safetensors",
                                                                       "model.safetensors.index.json")):
                raise FileNotFoundError(f"--models: {spec!r} has a config.json but no weights (model.safetensors "
                                        "or its index)")  # found after the models before it had run
            out.append((label, path))
            continue
        ckpts = run_checkpoints(path)
        if not ckpts:
            raise FileNotFoundError(f"--models: {spec!r} is neither a model folder (config.json) nor a run "
                                    "folder (step-*/ or final/ checkpoints)")
        out += [(label if len(ckpts) == 1 else f"{label}@{n}", p) for n, p in ckpts]
    seen = [lab for lab, _ in out]
    dup = sorted({lab for lab in seen if seen.count(lab) > 1})
    if dup:
        raise ValueError(f"--labels: duplicate model labels {dup}; pass one distinct label per model")
    return out


def load_task_problems(task: str, difficulty: int | None, n: int, seed: int, arg: str = "task"):
    from reasonrl.rl.tasks import get_task
    try:
        return get_task(task, difficulty).problems(n, seed, split="test")
    except (ImportError, ValueError) as e:  # an optional package missing counts as a bad --task too
        raise ValueError(f"--{arg}: {e}") from None


# ------------------------------------------------------------------------------- one setting
def tag_ids(tok) -> tuple[list[int], list[int]]:
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    return enc("<think>"), enc("</think>")


def generate_setting(engine, tok, prompts, problems, params, n: int) -> list[dict]:
    """One generate call over all problems x n samples -> one record per completion, problem-major."""
    from reasonrl.rl.rewards import _code_block, accuracy_reward, extract_answer, format_reward
    start, end = tag_ids(tok)
    outs = engine.generate(prompts, params, n=n)
    recs = []
    for prompt, prob, group in zip(prompts, problems, outs):
        inside = opens_think(prompt, start, end)
        for c in group:
            text = c.text or ""
            spans = think_spans(c.token_ids, start, end, inside)
            # a prompt that opened <think> (template "...<think>") owes the completion its tag
            # the vote of a code problem is the code its tests ran (maj@k: no <answer>, no vote before)
            answer = _code_block(text) if prob.checker == "code" else extract_answer(text)
            recs.append({"question": prob.question, "gold": prob.answer, "text": text, "answer": answer,
                         "checker": prob.checker, "correct": accuracy_reward(text, prob) > 0,
                         "format": format_reward("<think>" + text if inside else text) > 0, "length": c.length, "think": sum(spans),
                         "max_span": max(spans, default=0), "truncated": c.finish_reason == "length"})
    return recs


def summarize(recs: list[dict]) -> dict:
    m = len(recs)
    return {"accuracy": sum(r["correct"] for r in recs) / m,
            "mean_thinking_tokens": sum(r["think"] for r in recs) / m,
            "max_thinking_span": max(r["max_span"] for r in recs),
            "mean_length": sum(r["length"] for r in recs) / m,
            "format_rate": sum(r["format"] for r in recs) / m,
            "truncated_rate": sum(r["truncated"] for r in recs) / m, "completions": m}


def passk_metrics(recs: list[dict], n: int, ks: list[int]) -> dict:
    groups = [recs[i:i + n] for i in range(0, len(recs), n)]
    out = {}
    for k in ks:
        out[f"pass@{k}"] = sum(pass_at_k(n, sum(r["correct"] for r in g), k) for g in groups) / len(groups)
    same_code = lambda a, b: a.strip() == b.strip()  # noqa: E731 (code votes: the same program text)
    for k in ks:
        out[f"maj@{k}"] = sum(maj_at_k([r["answer"] for r in g], [r["correct"] for r in g], k,
                                       same_code if g[0].get("checker") == "code" else answers_equal)
                              for g in groups) / len(groups)
    return out


# ------------------------------------------------------------------------------- one model
def budget_settings(cfg: EvalConfig) -> list[tuple[str, dict]]:
    """(name, SamplingParams thinking fields) of the budget curve's points."""
    return ([("natural", {})] + [(f"budget={b}", {"think_budget": b}) for b in cfg.budget_list]
            + [(f"extend={e}", {"think_extend": e, "think_extend_text": cfg.extend_text}) for e in cfg.extend_list])


def evaluate_model(model, tok, cfg: EvalConfig, problems, by_difficulty: dict, bar=None, label="",
                   samples: list | None = None) -> dict:
    """Every section of the evaluation for one model; `by_difficulty` maps level -> problems.
    samples: if given, every completion's record is appended to it (tagged with model and setting)."""
    from reasonrl.engine import LLMEngine, SamplingParams
    from reasonrl.train.common import encode_prompt

    engine = LLMEngine(model, tokenizer=tok, max_num_seqs=cfg.batch)
    enc = lambda probs: [encode_prompt(tok, cfg.prompt_template, p.question) for p in probs]  # noqa: E731
    prompts, sections, out = enc(problems), cfg.section_list, {}

    def run(name, probs, prompts_, n, **fields):
        if bar is not None:
            bar.set_postfix_str(f"{label} {name}")
        temp = fields.pop("temperature", cfg.curve_temperature)
        params = SamplingParams(temperature=temp, top_p=cfg.top_p if temp > 0 else 1.0,
                                max_tokens=cfg.max_tokens, seed=cfg.seed, **fields)
        recs = generate_setting(engine, tok, prompts_, probs, params, n)
        if samples is not None:
            samples.extend({"model": label, "setting": name, **r} for r in recs)
        if bar is not None:
            bar.update(1)
        return recs

    if "passk" in sections or "markers" in sections:
        recs = run("samples", problems, prompts, cfg.n, temperature=cfg.temperature)
        if "passk" in sections:
            out["passk"] = {"n": cfg.n, "temperature": cfg.temperature, **passk_metrics(recs, cfg.n, cfg.ks),
                            **summarize(recs)}
        if "markers" in sections:
            tokens = sum(r["length"] for r in recs)
            out["markers"] = {"responses": len(recs), "tokens": tokens,
                              "markers": marker_counts([r["text"] for r in recs], cfg.marker_list, tokens)}
    if "budget" in sections:
        out["budget"] = []
        for name, fields in budget_settings(cfg):
            s = summarize(run(name, problems, prompts, cfg.curve_samples, **fields))
            out["budget"].append({"setting": name, "think_budget": fields.get("think_budget"),
                                  "think_extend": fields.get("think_extend", 0), **s})
    if "difficulty" in sections:
        out["difficulty"] = []
        for d, probs in by_difficulty.items():
            s = summarize(run(f"difficulty={d}", probs, enc(probs), cfg.curve_samples))
            out["difficulty"].append({"difficulty": d, **s})
    return out


def num_jobs(cfg: EvalConfig) -> int:
    s = cfg.section_list
    return (("passk" in s or "markers" in s) + ("budget" in s) * len(budget_settings(cfg))
            + ("difficulty" in s) * len(cfg.difficulty_list))


# ------------------------------------------------------------------------------- driver
def run_eval(cfg: EvalConfig, loaded: dict | None = None) -> dict:
    """Evaluate every model of cfg.models; write eval.json, summary.md and the plots; return the dict.

    loaded: optional {label: (model, tokenizer)} used instead of loading (tests, notebooks)."""
    from reasonrl.rl.tasks import BUILTIN
    from reasonrl.train.common import load_model_and_tokenizer

    # Check everything that can fail before the first model loads or generates.
    models = [(lab, "<given>") for lab in loaded] if loaded else resolve_models(cfg.models, cfg.labels)
    problems = load_task_problems(cfg.task, cfg.difficulty, cfg.num_problems, cfg.seed)
    by_difficulty = {}
    if "difficulty" in cfg.section_list and cfg.difficulty_list:
        if cfg.task not in BUILTIN:
            raise ValueError(f"--difficulties: task {cfg.task!r} has no difficulty knob (built-ins: "
                             f"{sorted(BUILTIN)}); pass --difficulties '' or drop 'difficulty' from --sections")
        by_difficulty = {d: load_task_problems(cfg.task, d, cfg.num_problems, cfg.seed, "difficulties")
                         for d in cfg.difficulty_list}
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device: cuda requested but torch sees no CUDA device")
    os.makedirs(cfg.out_dir, exist_ok=True)  # a path under a file failed after the whole evaluation
    if not os.access(cfg.out_dir, os.W_OK):
        raise PermissionError(f"--out_dir: {cfg.out_dir!r} is not writable")

    results = {"config": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "out_dir"},
               "models": [{"label": lab, "path": spec} for lab, spec in models], "results": {}}
    bar, samples = _bar(len(models) * num_jobs(cfg)), []
    try:
        for label, spec in models:
            model, tok = loaded[label] if loaded else load_model_and_tokenizer(spec, seed=cfg.seed, device=device)
            model = model.to(device).eval()
            results["results"][label] = evaluate_model(model, tok, cfg, problems, by_difficulty, bar, label, samples)
            write_text_atomic(os.path.join(cfg.out_dir, "eval.json"), json.dumps(results, indent=1))  # kept if a later one fails
    finally:
        bar.close()
    write_outputs(results, cfg, samples)
    return results


def write_outputs(results: dict, cfg: EvalConfig, samples: list[dict] = ()) -> None:
    from reasonrl.eval.plots import PLOTS, plot_all
    from reasonrl.eval.report import summary_table

    os.makedirs(cfg.out_dir, exist_ok=True)
    write_text_atomic(os.path.join(cfg.out_dir, "eval.json"), json.dumps(results, indent=1))
    write_text_atomic(os.path.join(cfg.out_dir, "samples.jsonl"), "".join(json.dumps(r) + "\n" for r in samples))
    table = summary_table(results)
    write_text_atomic(os.path.join(cfg.out_dir, "summary.md"), table + "\n")
    print(table, flush=True)
    made = plot_all(results, cfg.out_dir) if cfg.plots else []
    for png in made:
        print(f"[eval] wrote {png}")
    for name in PLOTS:  # an earlier evaluation's plots that this one did not draw would pass for its own
        stale = os.path.join(cfg.out_dir, f"{name}.png")
        if stale not in made and os.path.isfile(stale):
            os.remove(stale)
    print(f"[eval] wrote {os.path.join(cfg.out_dir, 'eval.json')}", flush=True)



def _bar(total: int):
    from reasonrl.train.common import progress_bar
    return progress_bar(total, "eval", "job")


def main(argv: list[str] | None = None) -> dict:
    from reasonrl.train.config import parse_config
    return run_eval(parse_config(EvalConfig, argv, "reasonrl eval"))
