"""Rewards on adversarial outputs: tags missing/nested/repeated, several answers, huge numbers,
unicode digits, empty output, expressions; custom reward functions by import path."""
import os
import random
import threading
import time

import pytest

from reasonrl.rl import verifier
from reasonrl.rl.rewards import _safe_expr
from reasonrl.rl.rewards import (accuracy_reward, answers_equal, compute_rewards, countdown_check,
                                 extract_answer, format_reward, load_reward_fn, parse_reward_spec)
from reasonrl.rl.tasks import Problem


@pytest.mark.parametrize("text, want", [
    ("<think>x</think><answer>42</answer>", "42"),
    ("<answer>1</answer> then <answer>2</answer>", "2"),             # last one wins
    ("<answer><answer>5</answer></answer>", "5"),                    # nested: innermost
    ("<answer>7</answer><answer>8", "7"),                            # unclosed last tag ignored
    ("<answer>\\boxed{3/4}</answer>", "3/4"),
    ("so \\boxed{\\frac{1}{2}} and \\boxed{12}", "12"),
    ("\\boxed{{a}{b}}", "{a}{b}"),                                   # balanced braces
    ("\\boxed{unclosed", None),
    ("no answer at all", None),
    ("", None),
    (None, None),
    ("</answer>9<answer>", None),
])
def test_extract_answer(text, want):
    assert extract_answer(text) == want


@pytest.mark.parametrize("pred, gold", [
    ("42", "42"), ("  42. ", "42"), ("+42", "42"), ("042", "42"), ("1,234", "1234"), ("1234", "1,234"),
    ("0.5", "1/2"), ("\\frac{1}{2}", "0.50"), ("\\dfrac{6}{4}", "1.5"), ("2.5e1", "25"),
    ("$12$", "12"), ("\\text{12}", "12"), ("-3", "\u22123"),
    ("٤٢", "42"), ("４２", "42"), ("४२", "42"),                         # Arabic-Indic, full-width, Devanagari
    ("3+4", "7"), ("2*x + x", "3*x"), ("sqrt(2)/2", "1/sqrt(2)"), ("x^2", "x**2"),
    ("Paris.", "Paris"),                                              # a final period is no part of the answer
])
def test_equal(pred, gold):
    assert answers_equal(pred, gold), (pred, gold)


@pytest.mark.parametrize("pred, gold", [
    ("41", "42"), ("", "42"), (None, "42"), ("0.51", "1/2"), ("1/0", "0"), ("x", "y"),
    ("٤٣", "42"), ("42abc", "42"), ("4 2", "42"), ("2*x", "3*x"), ("inf", "1"), ("nan", "nan0"),
    ("1234,567", "1234567"),                                          # not a thousands grouping
    ("$", ""), (".", "$"),                                             # nothing left after normalization
])
def test_not_equal(pred, gold):
    assert not answers_equal(pred, gold), (pred, gold)


@pytest.mark.parametrize("pred", ["9**9**9**9", "9^9^9^9", "10**100000000", "1e999999999", "1e-999999999",
                                  "(" * 500 + "1" + ")" * 500, "1" * 100_000, "x**99999999"])
def test_huge_inputs_do_not_hang(pred):
    t = time.perf_counter()
    assert not answers_equal(pred, "1")
    assert time.perf_counter() - t < 3.0


NESTED = "(((((((9**64)**64)**64)**64)**64)**64)**64)"  # 9**(64**7): a number of 10**13 bits


@pytest.mark.parametrize("expr", [NESTED, "((x+1)**64)**64", "1<<(1<<40)", "7 % 3", "7 // 2", "3 @ 4", "1 | 2",
                                  "x.real", "x[0]", "(1, 2)", "f(x)", "sqrt()", "2.0**0.5**99", "1" * 101])
def test_safe_expr_refuses(expr):
    """Only + - * / and small literal powers of a bounded size reach sympy: nested powers of literal
    exponents (each at most 64) passed the AST check and hung sympy in C."""
    assert _safe_expr(expr) is None


@pytest.mark.parametrize("expr", ["2**64", "(x+1)**64", "sqrt(2)/2", "-x**-2", "(2**32)**64", "sin(x)**2+cos(x)**2"])
def test_safe_expr_accepts(expr):
    assert _safe_expr(expr) == expr


@pytest.mark.parametrize("pred", ["(x+y+1)**64*(x-y)**64", "(x+1)**64*(x-1)**64*(x+2)**32"])
def test_slow_sympy_is_cut_in_a_thread(pred):
    """sympy's simplify of these takes ~20 s; SIGALRM reaches only the main thread, so in a thread it ran
    to the end. The worker process is killed at the timeout in any thread."""
    assert _safe_expr(pred) is not None
    assert answers_equal("2*x + x", "3*x")  # the worker started (not timed below)
    out = []

    def run():
        t = time.perf_counter()
        out.append((answers_equal(pred, "1", timeout=0.5), time.perf_counter() - t))
    th = threading.Thread(target=run)
    th.start()
    th.join(30)
    assert out and out[0][0] is False and out[0][1] < 3.0, out
    assert answers_equal("sqrt(2)/2", "1/sqrt(2)")  # a fresh worker


def test_sympy_in_process_when_the_worker_cannot_start(monkeypatch):
    """No worker (it failed to start, or not POSIX): sympy runs here, under SIGALRM on the main thread,
    a best effort (a signal waits for sympy to come back from C: 0.5 s took 21 s in one run), hence
    the worker."""
    monkeypatch.setattr(verifier, "sympy_equal", lambda a, b, timeout=1.0: None)
    assert answers_equal("2*x + x", "3*x") and not answers_equal("2*x", "3*x")
    assert answers_equal("sqrt(2)/2", "1/sqrt(2)") and not answers_equal("sqrt(2)", "1/sqrt(2)")


def test_long_digit_runs_and_expanding_unicode_take_linear_time():
    """The decimal regex split a run of digits two ways and backtracked quadratically (20,000 digits
    and an x: 8 s in the trainer's process); NFKC grows U+FDFA 18x (1 MB of it: 4 s) before any cap."""
    from reasonrl.rl.rewards import _to_number
    t = time.perf_counter()
    assert _to_number("1" * 3999 + "x") is None and not answers_equal("1" * 9000 + "x", "42")
    assert not answers_equal("1" * 40_000 + "x", "42") and not answers_equal("\ufdfa" * 1_000_000, "42")
    assert time.perf_counter() - t < 1.0
    assert answers_equal("1.50", "1.5") and answers_equal("2.", "2") and answers_equal(".5", "0.5")


def test_huge_integers_compare_exactly():
    digits = "".join(random.choice("0123456789") for _ in range(6000)).lstrip("0") or "1"
    assert answers_equal(digits, digits)
    assert answers_equal("000" + digits, digits)
    other = digits[:-1] + str((int(digits[-1]) + 1) % 10)
    assert not answers_equal(other, digits)


def test_format_reward():
    assert format_reward("<think>a</think><answer>1</answer>") == 1.0
    assert format_reward("  <think>\nlong\n</think>\n<answer> 1 </answer>\n") == 1.0
    for bad in ["", "<answer>1</answer>", "<think>a</think>", "<think>a</think><answer></answer>",
                "<think>a</think><answer>1</answer><answer>2</answer>", "<think><think>a</think><answer>1</answer>",
                "<answer>1</answer><think>a</think>", "x<think>a</think><answer>1</answer>",
                "<think>a</think><answer>1</answer>trailing", "<think>a</think><answer> \n </answer>"]:
        assert format_reward(bad) == 0.0, bad


def test_countdown_check():
    assert countdown_check("(25-3)*4+7", [25, 3, 4, 7], 95)
    assert countdown_check("7 + 4*(25 - 3)", [7, 4, 25, 3], 95)
    assert countdown_check("6/4*2", [6, 4, 2], 3)                   # exact fractions, not floats
    assert not countdown_check("25*3", [25, 3, 4, 7], 75)           # must use every number
    assert not countdown_check("25*3*3", [25, 3], 225)              # each number once
    assert not countdown_check("(25-3)*4+7", [25, 3, 4, 7], 96)     # wrong value
    assert not countdown_check("2**10", [2, 10], 1024)              # no powers
    assert not countdown_check("-3+5", [3, 5], 2)                   # no unary minus
    assert not countdown_check("1/(2-2)", [1, 2, 2], 0)             # division by zero
    assert countdown_check("(25-3)*4+7=95", [25, 3, 4, 7], 95)      # "= target" after the expression
    # the multiplication and division signs people write (each scored 0 before 2026-11-30)
    for expr in ("(25-3)\u00d74+7", "(25-3)\\times 4+7", "(25-3)\u22c54+7"):
        assert countdown_check(expr, [25, 3, 4, 7], 95), expr
    for expr in ("6\u00f74*2", "6\\div 4*2"):
        assert countdown_check(expr, [6, 4, 2], 3), expr
    assert not countdown_check("__import__('os').system('true')", [1], 1)
    assert not countdown_check("(" * 300 + "1" + ")" * 300, [1], 1)
    assert not countdown_check(None, [1], 1)


def test_accuracy_reward_dispatch():
    p = Problem("2+2", "4")
    assert accuracy_reward("<think>.</think><answer>4</answer>", p) == 1.0
    assert accuracy_reward("<think>.</think><answer>5</answer>", p) == 0.0
    assert accuracy_reward("4", p) == 0.0  # not string-matched against the whole text
    c = Problem("Use 2 3 to make 6", "2*3", checker="countdown", meta={"numbers": [2, 3], "target": 6})
    assert accuracy_reward("<answer>3*2</answer>", c) == 1.0
    assert accuracy_reward("<answer>3+3</answer>", c) == 0.0


def my_reward(response, problem):
    return float(len(response))


def test_custom_reward_by_import_path():
    fn = load_reward_fn("test_rewards:my_reward")
    assert fn("abc", None) == 3.0
    spec = parse_reward_spec("accuracy:1.0, format:0.1, test_rewards:my_reward:0.5")
    assert [(n, w) for n, _, w in spec] == [("accuracy", 1.0), ("format", 0.1), ("test_rewards:my_reward", 0.5)]
    total, parts = compute_rewards(["<think>a</think><answer>4</answer>"], [Problem("2+2", "4")], spec)
    assert total[0] == pytest.approx(1.0 + 0.1 + 0.5 * 34)
    assert parts["accuracy"] == [1.0] and parts["format"] == [1.0]


@pytest.mark.parametrize("spec, msg", [("nope", "built-in name"), ("no_such_mod_xyz:f", "cannot import"),
                                       ("test_rewards:missing_fn", "no callable"), ("", "no reward"),
                                       ("accuracy:inf", "finite")])
def test_bad_reward_specs(spec, msg):
    with pytest.raises(ValueError, match=msg):
        parse_reward_spec(spec)


def _returns(value):
    return lambda response, problem: value if response == "bad" else 1.0


@pytest.mark.parametrize("value, shown", [(float("nan"), "nan"), (float("inf"), "inf"), (None, "None"),
                                          ("good", "'good'"), ([1.0], r"\[1\.0\]")])
def test_custom_reward_must_return_a_finite_number(value, shown):
    """A NaN reward was dropped silently by dynamic sampling (every comparison false); None or a
    string crashed with a TypeError deep inside: the error names the reward spec and the completion."""
    spec = [("accuracy", accuracy_reward, 1.0), ("myrew:bad", _returns(value), 1.0)]
    with pytest.raises(ValueError, match=rf"reward 'myrew:bad' returned {shown} for completion 2"):
        compute_rewards(["a", "b", "bad"], [Problem("1+1", "2")] * 3, spec)


def test_custom_reward_errors_name_the_spec():
    def boom(response, problem):
        raise RuntimeError("boom")

    with pytest.raises(ValueError, match=r"reward 'myrew:boom' raised RuntimeError for completion 0: boom"):
        compute_rewards(["a"], [Problem("1+1", "2")], [("myrew:boom", boom, 1.0)])
    total, parts = compute_rewards(["a"], [Problem("1+1", "2")], [("ok", lambda r, p: True, 0.5)])
    assert total == [0.5] and parts["ok"] == [1.0]  # bools and ints are numbers


def test_superscripts_are_not_digits_and_fractions_fold():
    """NFKC made the superscript in '4²' a digit: '4²' verified equal to 42."""
    from reasonrl.rl.rewards import answers_equal
    assert not answers_equal("4²", "42") and not answers_equal("x₂", "x2")
    assert answers_equal("½", "0.5") and answers_equal("３⁄４", "0.75") and answers_equal("٤٢", "42")


def test_repeated_tags_take_linear_time():
    """The format regex backtracked quadratically over repeated tags: 85 KB took 5 s, 340 KB 78 s."""
    import time

    from reasonrl.rl.rewards import accuracy_reward, format_reward
    from reasonrl.rl.tasks import Problem
    for text in ["<think>" + "</think><answer>x" * 20000, "<answer>1" * 40000, "<think>" * 50000 + "</think><answer>1</answer>"]:
        t = time.perf_counter()
        assert format_reward(text) == 0.0
        accuracy_reward(text, Problem("q", "1"))
        assert time.perf_counter() - t < 2.0, len(text)


def test_reward_module_in_the_working_directory(tmp_path, monkeypatch):
    """The `reasonrl` console script has no working directory on sys.path (`python -m reasonrl` has):
    `--rewards myrw:fn` from the folder holding myrw.py failed to import there."""
    import os
    import sys

    from reasonrl.rl.rewards import load_reward_fn
    (tmp_path / "myrw_cwd_test.py").write_text("def fn(response, problem):\n    return 0.25\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", os.getcwd(), str(tmp_path))])
    monkeypatch.delitem(sys.modules, "myrw_cwd_test", raising=False)
    assert load_reward_fn("myrw_cwd_test:fn")("x", None) == 0.25
    with pytest.raises(ValueError, match="cannot import module 'no_such_reward_mod'"):
        load_reward_fn("no_such_reward_mod:fn")


# ----------------------------------------------------------------------------- math-verify (tasks extra)
needs_math_verify = pytest.mark.skipif(not verifier.available(), reason="math-verify is not installed")


@needs_math_verify
@pytest.mark.parametrize("pred, gold", [
    ("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}"), ("\\frac{\\pi}{4}", "\\pi/4"), ("3\\sqrt{2}", "\\sqrt{18}"),
    ("[0,1)", "[0, 1)"), ("\\{1,2\\}", "\\{2,1\\}"), ("2x+x", "3x"),
])
def test_latex_equal_through_math_verify(pred, gold):
    assert answers_equal(pred, gold), (pred, gold)


@needs_math_verify
@pytest.mark.parametrize("pred, gold", [
    ("\\frac{1}{2}abc", "1/2"), ("\\frac{\\sqrt{2}}{3}", "\\frac{1}{\\sqrt{2}}"), ("[0,1]", "[0,1)"),
    ("\\{1,2,3\\}", "\\{2,1\\}"), ("2x+y", "3x"), ("42abc", "42"), ("1e-999999999", "1"), ("x=4", "3"),
])
def test_latex_not_equal_through_math_verify(pred, gold):
    """Each side is read whole: math-verify's default extraction found 42 in "42abc" (and 1 in
    "1e-999999999") and called them equal."""
    assert not answers_equal(pred, gold), (pred, gold)


@needs_math_verify
def test_math_verify_hangs_are_cut():
    """sympy's big-integer powers run in C, where no signal reaches them: the worker is killed at the
    timeout (a restart counted), and the next query gets a fresh one."""
    w = verifier.worker()
    assert answers_equal("\\frac{\\pi}{4}", "\\pi/4")  # started and warm
    for pred in ["9^{9^{9^{9}}}", "10^{100000000}", "\\binom{10^{9}}{10^{5}}"]:
        before = w.restarts
        t = time.perf_counter()
        assert not answers_equal(pred, "1", timeout=0.5)
        assert time.perf_counter() - t < 3.0
        assert w.restarts == before + 1, pred
    assert answers_equal("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}")
    w.proc.kill()  # one that died between queries is replaced
    w.proc.wait()
    assert answers_equal("\\frac{\\pi}{4}", "\\pi/4")
    # its own session: a terminal's Ctrl-C (sent to the whole foreground group) is the trainer's alone; it
    # reached the worker, which then judged an equal pair unequal in the step being finished
    assert os.getsid(w.proc.pid) != os.getsid(0)


@needs_math_verify
def test_math_verify_from_a_thread():
    """No signals in threads: the process boundary still cuts a hang there."""
    out = []
    th = threading.Thread(target=lambda: out.append((answers_equal("9^{9^{9^{9}}}", "1", timeout=0.5),
                                                     answers_equal("\\frac{\\pi}{4}", "\\pi/4"))))
    th.start()
    th.join(30)
    assert out == [(False, True)]


def test_latex_without_math_verify(monkeypatch):
    """Not installed: what reasonrl's own checks cannot read counts as not equal; they still decide the rest."""
    monkeypatch.setattr(verifier, "_AVAILABLE", [False])
    assert not answers_equal("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}")
    assert answers_equal("\\frac{1}{2}", "0.5") and answers_equal("\\sqrt{2}/2", "1/sqrt(2)")


def test_math_verify_worker_that_cannot_start(monkeypatch):
    monkeypatch.setattr(verifier, "_AVAILABLE", [True])
    monkeypatch.setattr(verifier, "_WORKER", "import sys; sys.exit(1)")
    w = verifier._Worker()
    with pytest.warns(RuntimeWarning, match="did not start"):
        assert w.query("latex", "\\pi", "\\pi", 1.0) is None
    assert w.query("sympy", "x", "x", 1.0) is None and w.proc is None  # not retried on every answer


def test_number_checker_and_partial_scores():
    """Mutation-testing survivors (2026-11-30): the number checker's minus sign, and a scorer's partial
    credit, which is no verified answer."""
    from types import SimpleNamespace

    from reasonrl.rl.rewards import numbers_equal
    assert numbers_equal("\u22125", "-5") and numbers_equal("-5", "\u22125") and not numbers_equal("5", "-5")
    p = SimpleNamespace(checker="score", answer="x", meta={"score": lambda pred, m: 0.5})
    assert accuracy_reward("<answer>y</answer>", p) == 0.0
    p.meta["score"] = lambda pred, m: 1.0
    assert accuracy_reward("<answer>y</answer>", p) == 1.0
