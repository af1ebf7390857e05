"""reasonrl.eval: pass@k / maj@k against closed forms and hand-built lists, thinking-token counting,
budget forcing that really caps and extends (a scripted model whose outputs are known exactly),
determinism by seed, clear errors, and the comparison mode's files."""
import json
import os
import random
import shutil
from fractions import Fraction
from math import comb

import pytest
import torch
from torch import nn

from reasonrl.eval.metrics import maj_at_k, majority, marker_counts, pass_at_k, think_spans
from reasonrl.eval.run import EvalConfig, main, resolve_models, run_eval
from reasonrl.models import builtin_path, init_model, load_tokenizer, save_model
from reasonrl.rl.tasks import split_of
from reasonrl.train.config import parse_config


def _load(path):
    with open(path) as f:
        return json.load(f)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(builtin_path("tiny"))


# ---- pass@k and maj@k -------------------------------------------------------------------------------
def test_pass_at_k_matches_closed_form():
    rng = random.Random(int.from_bytes(os.urandom(4), "little"))
    for _ in range(300):
        n = rng.randint(1, 60)
        c, k = rng.randint(0, n), rng.randint(1, n)
        exact = 1 - Fraction(comb(n - c, k), comb(n, k))
        assert abs(pass_at_k(n, c, k) - float(exact)) < 1e-12, (n, c, k)
    assert abs(pass_at_k(2000, 7, 500) - float(1 - Fraction(comb(1993, 500), comb(2000, 500)))) < 1e-12


def test_pass_at_k_edge_cases():
    assert pass_at_k(10, 0, 1) == 0.0 and pass_at_k(10, 0, 10) == 0.0  # c = 0
    assert pass_at_k(10, 10, 1) == 1.0 and pass_at_k(10, 10, 7) == 1.0  # c = n
    assert pass_at_k(10, 1, 10) == 1.0 and pass_at_k(10, 0, 10) == 0.0  # k = n: any correct sample counts
    assert abs(pass_at_k(10, 3, 1) - 0.3) < 1e-15  # pass@1 = c / n
    with pytest.raises(ValueError, match="k must be in"):
        pass_at_k(4, 1, 5)  # n < k
    with pytest.raises(ValueError, match="c must be in"):
        pass_at_k(4, 5, 1)


def test_majority_and_maj_at_k_on_hand_built_lists():
    # "0.5" and "1/2" are one answer for the rewards module; "3" twice ties with them: first class wins
    assert majority(["1/2", "3", "0.5", "3"]) == 0
    assert majority(["3", "1/2", "0.5", "3"]) == 0
    assert majority(["7", "1/2", "0.50", "\\frac{1}{2}"]) == 1  # 3 equivalent forms beat "7"
    assert majority([None, None]) is None and majority([None, "4"]) == 1  # no answer, no vote
    assert majority(["٤٢", "42", "41"]) == 0  # Arabic-Indic digits normalized
    ans = ["5", "4", "4", None, "5", "5", "1", "2"]
    ok = [a == "5" for a in ans]
    assert maj_at_k(ans, ok, 1) == 3 / 8  # maj@1 = pass@1 on these samples
    assert maj_at_k(ans, ok, 4) == 0.5  # run 1: 4 wins (2 votes vs 1), run 2: 5 wins
    assert maj_at_k(ans, ok, 8) == 1.0  # 5 has 3 votes
    assert maj_at_k(ans, ok, 3) == 0.5  # runs [5,4,4] -> 4, [None,5,5] -> 5; the last 2 samples unused
    with pytest.raises(ValueError, match="k must be in"):
        maj_at_k(ans, ok, 9)


def test_think_spans_and_markers():
    S, E = [7], [8, 9]  # a two-token end tag
    assert think_spans([1, 7, 2, 3, 8, 9, 4], S, E) == [2]
    assert think_spans([2, 3, 8, 9, 7, 5, 8, 9, 6], S, E, inside=True) == [2, 1]
    assert think_spans([7, 2, 8, 2], S, E) == [3]  # an unfinished end tag is thinking; unclosed span counts
    assert think_spans([1, 2], S, E) == []
    m = marker_counts(["Wait, let me check. Checking again", "await hmm", ""], ["wait", "check", "hmm"], 500)
    assert m["wait"]["count"] == 1 and m["check"]["count"] == 2 and m["hmm"]["count"] == 1
    assert m["check"]["per_1k_tokens"] == 4.0 and m["wait"]["response_rate"] == 1 / 3


# ---- a model whose outputs are known: next token = rule[previous token] ------------------------------
class Scripted(nn.Module):
    def __init__(self, tok, rule: dict[str, str], default: str):
        super().__init__()
        from types import SimpleNamespace
        V = len(tok)
        ids = tok.convert_tokens_to_ids
        self.config = SimpleNamespace(vocab_size=V, num_hidden_layers=1, num_key_value_heads=1, eos_token_id=None)
        self.head_dim = 2
        table = torch.full((V, V), -20.0)  # (prev, next) logits: one token per row at +20
        table[:, ids(default)] = 20.0
        for prev, nxt in rule.items():
            table[ids(prev)] = -20.0
            table[ids(prev), ids(nxt)] = 20.0
        self.table = nn.Parameter(table, requires_grad=False)

    def forward(self, input_ids, positions, ctx):
        return self.table[input_ids]

    def compute_logits(self, hidden):
        return hidden


ANSWER = {"</think>": "<answer>", "<answer>": "3", "3": "6", "6": "</answer>", "</answer>": "<eos>"}


def _test_questions_file(path, k=3):
    """A JSONL task whose held-out questions all have the answer 36."""
    qs = [q for q in (f"q{i}" for i in range(400)) if split_of(q) == "test"][:k]
    with open(path, "w") as f:
        f.writelines(json.dumps({"question": q, "answer": "36"}) + "\n" for q in qs)
    return f"jsonl:{path}"


def test_budget_forcing_caps_and_extends(tok, tmp_path):
    loops = Scripted(tok, {"<think>": "a", **ANSWER}, default="a")  # never ends thinking by itself
    ends = Scripted(tok, {"<think>": "a", "a": "b", "b": "</think>", "t": "a", **ANSWER}, default="a")
    cfg = EvalConfig(task=_test_questions_file(tmp_path / "q.jsonl"), num_problems=3, sections="budget",
                     budgets="0,3,5", extends="1,2", max_tokens=30, prompt_template="{question}\n<think>",
                     out_dir=str(tmp_path / "out"), plots=False)
    res = run_eval(cfg, loaded={"loops": (loops, tok), "ends": (ends, tok)})["results"]
    pts = {lab: {p["setting"]: p for p in res[lab]["budget"]} for lab in res}
    L, N = pts["loops"], pts["ends"]
    # capped: exactly `budget` thinking tokens, then the forced </think> and the (correct) answer
    for b in (0, 3, 5):
        assert L[f"budget={b}"]["mean_thinking_tokens"] == b == L[f"budget={b}"]["max_thinking_span"]
        assert L[f"budget={b}"]["accuracy"] == 1.0 and L[f"budget={b}"]["format_rate"] == 1.0
        assert N[f"budget={b}"]["mean_thinking_tokens"] == min(b, 2)  # "ab" is below the cap
    # uncapped, the looping model thinks until max_tokens and never answers
    assert L["natural"]["mean_thinking_tokens"] == 30 and L["natural"]["accuracy"] == 0.0
    assert L["natural"]["truncated_rate"] == 1.0
    # extended: each "</think>" the model emits becomes "Wait" (4 tokens) + "ab" again
    assert N["natural"]["mean_thinking_tokens"] == 2
    assert N["extend=1"]["mean_thinking_tokens"] == 2 + 6 and N["extend=2"]["mean_thinking_tokens"] == 2 + 12
    assert all(N[s]["accuracy"] == 1.0 for s in ("natural", "extend=1", "extend=2"))
    saved = _load(tmp_path / "out" / "eval.json")
    assert saved["results"]["ends"]["budget"][-1]["mean_thinking_tokens"] == 14


def test_passk_and_markers_sections_with_a_scripted_model(tok, tmp_path):
    says_wait = Scripted(tok, {"<think>": "W", "W": "a", "a": "i", "i": "t", "t": "</think>", **ANSWER}, "a")
    cfg = EvalConfig(task=_test_questions_file(tmp_path / "q.jsonl"), num_problems=3, n=2, k="2",
                     sections="passk,markers", markers="wait,hmm", prompt_template="{question}\n<think>",
                     out_dir=str(tmp_path / "out"), plots=False)
    r = run_eval(cfg, loaded={"m": (says_wait, tok)})["results"]["m"]
    # "Wait</think><answer>36</answer><eos>": 10 tokens, 4 of them thinking, one "wait"
    assert r["passk"]["pass@1"] == r["passk"]["pass@2"] == r["passk"]["maj@2"] == 1.0
    assert r["passk"]["mean_length"] == 10 and r["passk"]["mean_thinking_tokens"] == 4
    assert r["markers"]["tokens"] == 60 and r["markers"]["responses"] == 6
    assert r["markers"]["markers"]["wait"] == {"count": 6, "per_response": 1.0, "per_1k_tokens": 100.0,
                                               "response_rate": 1.0}
    assert r["markers"]["markers"]["hmm"]["count"] == 0


# ---- the whole command with the built-in tiny model (random init) ------------------------------------
SMALL = ["--num_problems", "4", "--n", "3", "--k", "1,2,3", "--max_tokens", "20", "--budgets", "4",
         "--extends", "1", "--difficulties", "2,3"]


def test_eval_is_deterministic_with_a_seed(tmp_path):
    runs = []
    for i, seed in enumerate((5, 5, 6)):
        out = tmp_path / f"r{i}"
        main(SMALL + ["--seed", str(seed), "--out_dir", str(out), "--plots", "false"])
        runs.append(_load(out / "eval.json"))
    assert runs[0] == runs[1]
    assert runs[0]["results"] != runs[2]["results"]  # the seed matters (init and samples)
    r = runs[0]["results"]["tiny"]
    assert set(r) == {"passk", "markers", "budget", "difficulty"}
    assert [p["setting"] for p in r["budget"]] == ["natural", "budget=4", "extend=1"]
    assert r["budget"][1]["max_thinking_span"] <= 4


def test_comparison_mode_writes_json_and_pngs(tmp_path):
    path = builtin_path("tiny")
    run, tok = tmp_path / "grpo", load_tokenizer(path)
    save_model(init_model(path, seed=1), str(run / "step-0000010"), tokenizer=tok)
    save_model(init_model(path, seed=2), str(run / "step-0000002"), tokenizer=tok)
    save_model(init_model(path, seed=3), str(run / "final"), tokenizer=tok)
    shutil.copytree(run / "final", run / "step-0000020")  # the stage's last save: same weights as final/
    assert [lab for lab, _ in resolve_models(f"tiny,{run}/final/", "")] == ["tiny", "grpo"]  # final/ -> its run
    out = tmp_path / "cmp"
    main(SMALL + ["--models", f"tiny,{run}", "--labels", "sft,grpo", "--out_dir", str(out),
                  "--budgets", "", "--extends", "1", "--num_problems", "2", "--n", "2", "--k", "2"])
    res = _load(out / "eval.json")
    assert [m["label"] for m in res["models"]] == ["sft", "grpo@step-2", "grpo@step-10", "grpo@final"]
    assert list(res["results"]) == ["sft", "grpo@step-2", "grpo@step-10", "grpo@final"]
    for name in ("passk", "budget", "difficulty", "markers"):
        with open(out / f"{name}.png", "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "| grpo@final |" in (out / "summary.md").read_text()


# ---- clear errors -------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, exc, match", [
    (["--budgets", "4,x"], ValueError, "--budgets"),
    (["--budgets", "-1"], ValueError, "--budgets"),
    (["--budgets", "64", "--max_tokens", "64"], ValueError, "--budgets"),
    (["--extends", "0"], ValueError, "--extends"),
    (["--k", "16", "--n", "8"], ValueError, "--k"),
    (["--difficulties", "0"], ValueError, "--difficulties"),
    (["--sections", "passk,nope"], ValueError, "--sections"),
    (["--curve_samples", "4"], ValueError, "--curve_samples"),
    (["--temperature", "0"], ValueError, "--temperature"),
])
def test_bad_config_is_a_clear_error(args, exc, match):
    with pytest.raises(exc, match=match):
        parse_config(EvalConfig, args)


def test_default_k_follows_n():
    """--k left at its default takes 1, 4, 8 as far as --n allows; a k given above n stays an error."""
    assert EvalConfig().ks == [1, 4, 8]
    assert parse_config(EvalConfig, ["--n", "4"]).ks == [1, 4]
    assert parse_config(EvalConfig, ["--n", "1"]).ks == [1]
    assert parse_config(EvalConfig, ["--n", "4", "--k", "2"]).ks == [1, 2]
    with pytest.raises(ValueError, match="--k: every k must be <= n=4"):
        parse_config(EvalConfig, ["--n", "4", "--k", "1,4,8"])


def test_default_budgets_and_difficulties_follow_the_other_flags():
    """Left at "auto", the thinking budgets stay below --max_tokens and the difficulty levels apply to
    built-in tasks only (a JSONL task skips the section); given explicitly, both are checked."""
    assert EvalConfig().budget_list == [4, 8, 16, 24, 32] and EvalConfig().difficulty_list == [3, 4, 5, 6]
    assert parse_config(EvalConfig, ["--max_tokens", "16"]).budget_list == [4, 8]
    assert parse_config(EvalConfig, ["--max_tokens", "4"]).budget_list == []
    assert parse_config(EvalConfig, ["--task", "jsonl:q.jsonl"]).difficulty_list == []
    assert parse_config(EvalConfig, ["--budgets", ""]).budget_list == []
    with pytest.raises(ValueError, match="--budgets: every budget must be < max_tokens=16"):
        parse_config(EvalConfig, ["--max_tokens", "16", "--budgets", "8,16"])


def test_missing_checkpoint_unknown_task_bad_labels(tmp_path):
    with pytest.raises(FileNotFoundError, match="--models: no such checkpoint folder"):
        main(["--models", str(tmp_path / "nope"), "--out_dir", str(tmp_path / "o")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither a model folder"):
        main(["--models", str(tmp_path / "empty"), "--out_dir", str(tmp_path / "o")])
    with pytest.raises(ValueError, match="--task: task 'nope'"):
        main(["--task", "nope", "--out_dir", str(tmp_path / "o")])
    with pytest.raises(ValueError, match="--labels: 1 labels for 2 models"):
        main(["--models", "tiny,tiny", "--labels", "a", "--out_dir", str(tmp_path / "o")])
    with pytest.raises(ValueError, match="--labels: duplicate"):
        main(["--models", "tiny,tiny", "--out_dir", str(tmp_path / "o")])
    task = _test_questions_file(tmp_path / "q.jsonl")
    with pytest.raises(ValueError, match="--difficulties: task .* has no difficulty knob"):
        main(["--task", task, "--num_problems", "2", "--difficulties", "3,4", "--out_dir", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()  # every error came before any output


@pytest.mark.parametrize("template,why", [("{question} {foo}", "unknown placeholder"),
                                          ("Q: {question}{", "not a valid format string"),
                                          ("{{question}}", "must contain")])
def test_eval_prompt_template_checked_like_the_trainers(template, why):
    from reasonrl.eval.run import EvalConfig

    with pytest.raises(ValueError, match=f"EvalConfig.prompt_template: {why}"):
        EvalConfig(models="x", prompt_template=template)


# ---- found by an audit (2026-11-29) -------------------------------------------------------------------
def test_maj_at_k_votes_only_with_samples_scored_alike():
    """Countdown "Use 3 24 25 to make 4": "4" equals "(25+3)-24" as a number but does not use the numbers.
    One class held both and took its first member's score: 0.0 with 2 of 3 valid votes, 1.0 reversed."""
    ans, ok = ["4", "(25+3)-24", "25+3-24"], [False, True, True]
    assert maj_at_k(ans, ok, 3) == 1.0
    assert maj_at_k(ans[::-1][:1] + ["4", "4"], [True, False, False], 3) == 0.0
    assert majority(["4", "28-24"], keys=[False, True]) == 0 and majority(["4", "28-24"]) == 0


def test_maj_at_k_of_code_problems_votes_on_the_code(tmp_path):
    """A code answer in a fenced block, no <answer>: no vote, so maj@2 was 0 with pass@2 = 1."""
    from reasonrl.eval.run import passk_metrics
    code = "```python\ndef f(x):\n    return x + 1\n```"
    recs = [{"answer": "def f(x):\n    return x + 1\n", "checker": "code", "correct": True} for _ in range(2)]
    assert passk_metrics(recs, 2, [1, 2]) == {"pass@1": 1.0, "pass@2": 1.0, "maj@1": 1.0, "maj@2": 1.0}
    from reasonrl.rl.rewards import _code_block
    assert _code_block(code) == recs[0]["answer"]


def test_eval_checks_outputs_and_models_before_running(tmp_path):
    """Each failed only after every model before it had been evaluated, losing that work."""
    path = builtin_path("tiny")
    (tmp_path / "cfgonly").mkdir()
    shutil.copy(os.path.join(path, "config.json"), tmp_path / "cfgonly" / "config.json")
    with pytest.raises(FileNotFoundError, match="has a config.json but no weights"):
        main(["--models", f"tiny,{tmp_path / 'cfgonly'}", "--out_dir", str(tmp_path / "o")])
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError):
        main(SMALL + ["--out_dir", str(tmp_path / "file" / "o")])
    with pytest.raises(ValueError, match="--temperature: must be a finite number"):
        parse_config(EvalConfig, ["--temperature", "inf"])


def test_final_label_from_inside_its_run_folder(tmp_path, monkeypatch):
    path = builtin_path("tiny")
    save_model(init_model(path, seed=1), str(tmp_path / "grpo" / "final"), tokenizer=load_tokenizer(path))
    monkeypatch.chdir(tmp_path / "grpo")
    assert resolve_models("final", "") == [("grpo", "final")]  # the label was ""


def test_rerun_removes_plots_it_did_not_draw(tmp_path):
    out = tmp_path / "o"
    main(SMALL + ["--out_dir", str(out), "--budgets", "", "--extends", "1", "--num_problems", "2", "--n", "2",
                  "--k", "2"])
    assert (out / "passk.png").is_file() and (out / "markers.png").is_file()
    main(SMALL + ["--out_dir", str(out), "--sections", "difficulty", "--num_problems", "2"])
    assert not (out / "passk.png").exists() and not (out / "markers.png").exists()  # stale: removed
    assert (out / "difficulty.png").is_file() and not list(out.glob("*.tmp-*"))


def test_plots_past_ten_curves_use_distinct_colours(tmp_path):
    from reasonrl.eval.plots import _colors, _plt
    fig, ax = _plt().subplots()
    _colors(ax, 12)
    lines = [ax.plot([0, 1], [i, i])[0] for i in range(12)]
    assert len({line.get_color() if isinstance(line.get_color(), str) else tuple(line.get_color())
                for line in lines}) == 12
    _plt().close(fig)


def test_both_builtin_models_resolve():
    assert resolve_models("tiny,tiny-s", "") == [("tiny", "tiny"), ("tiny-s", "tiny-s")]  # tiny-s: "no such folder"
