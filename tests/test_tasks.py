"""Task generators: determinism, disjoint held-out splits, worked solutions that verify, the
difficulty knob, JSONL datasets (GSM8K / MATH shapes) and their errors."""
import json
import os
import random
import re
import time

import pytest

from reasonrl.rl.rewards import accuracy_reward, format_reward
from reasonrl.rl.tasks import (AddTask, CountdownTask, MultiplyTask, Problem, get_task, load_jsonl,
                               split_of)

TASKS = [MultiplyTask(), AddTask(), CountdownTask(), MultiplyTask(digits=(6, 8), b_digits=(2, 3)),
         CountdownTask(count=3, max_number=9)]


@pytest.mark.parametrize("task", TASKS, ids=lambda t: t.name)
def test_deterministic_and_verified(task):
    seed = random.randrange(10**6)
    a, b = task.problems(60, seed), task.problems(60, seed)
    assert [(p.question, p.answer, p.solution) for p in a] == [(p.question, p.answer, p.solution) for p in b]
    assert len({p.question for p in a}) == 60
    assert [p.question for p in task.problems(60, seed + 1)] != [p.question for p in a]
    for p in a:  # the worked solution is a correct, well-formatted response
        assert format_reward(p.solution) == 1.0, p.solution
        assert accuracy_reward(p.solution, p) == 1.0, (p.question, p.solution)
        wrong = p.solution.replace(f"<answer>{p.answer}</answer>", "<answer>-1</answer>")
        assert accuracy_reward(wrong, p) == 0.0


@pytest.mark.parametrize("task", TASKS[:3], ids=lambda t: t.name)
def test_splits_never_overlap(task):
    key = lambda p: p.meta.get("split_key", p.question)  # noqa: E731  (add: a+b and b+a share one)
    train = {key(p) for s in range(3) for p in task.problems(300, seed=s, split="train")}
    test = {key(p) for s in range(3) for p in task.problems(100, seed=s, split="test")}
    assert not train & test
    assert all(split_of(k) == "test" for k in test)
    excl = task.problems(50, seed=7)
    again = task.problems(200, seed=7, exclude={p.question for p in excl})
    assert not {p.question for p in again} & {p.question for p in excl}


def test_multiply_chain_of_thought():
    p = MultiplyTask().sample(random.Random(0))
    a, b = map(int, p.question.split("*"))
    assert int(p.answer) == a * b and 2 <= b <= 9 and 10 <= a < 10**5
    steps = p.solution.split("<think>")[1].split("</think>")[0].split(",")
    assert len(steps) == len(str(a))  # one partial product (and carry) per digit, right to left
    carry = 0
    for d, step in zip(reversed(str(a)), steps):
        lhs, rhs = step.split("=")
        assert lhs.startswith(f"{d}*{b}") and int(rhs) == int(d) * b + carry
        carry = int(rhs) // 10
    # about 35 tokens with the character tokenizer (each tag is one token)
    lens = [len(q.solution) - sum(len(t) - 1 for t in ("<think>", "</think>", "<answer>", "</answer>"))
            for q in MultiplyTask().problems(400, seed=1)]
    assert 28 <= sum(lens) / len(lens) <= 42


def test_difficulty_knob():
    easy, hard = get_task("multiply", difficulty=2), get_task("multiply", difficulty=6)
    assert max(len(p.question.split("*")[0]) for p in easy.problems(50, 0)) == 2
    assert max(len(p.question.split("*")[0]) for p in hard.problems(200, 0)) == 6
    assert all(len(p.meta["numbers"]) == 5 for p in get_task("countdown", difficulty=5).problems(10, 0))
    with pytest.raises(ValueError, match="difficulty"):
        get_task("add", difficulty=0)
    with pytest.raises(ValueError, match=r"difficulty: task 'multiply' takes 1..1000, got 5000"):
        get_task("multiply", difficulty=5000)  # failed deep inside int() with Python's 4300-digit limit
    with pytest.raises(ValueError, match="digits"):
        MultiplyTask(digits=(3, 2))
    with pytest.raises(ValueError, match="unknown-task|expected one of"):
        get_task("unknown-task")
    with pytest.raises(ValueError, match="could not find"):
        MultiplyTask(digits=(1, 1)).problems(1000, 0)  # only 72 distinct questions exist


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_jsonl_shapes(tmp_path):
    f = _write(tmp_path / "d.jsonl", [
        json.dumps({"question": "What is 2+2?", "answer": "4"}),
        "",
        json.dumps({"question": "Tom has 3 apples and buys 4. How many?",
                    "answer": "He has 3+4=<<3+4=7>>7 apples.\n#### 7"}),
        json.dumps({"problem": "Compute 1/2 + 1/4.", "solution": "We get $\\boxed{\\frac{3}{4}}$."}),
        json.dumps({"question": "n?", "answer": 12}),
    ])
    ps = load_jsonl(f)
    assert [p.answer for p in ps] == ["4", "7", "\\frac{3}{4}", "12"]
    assert ps[1].solution == "<think>He has 3+4=7 apples.</think><answer>7</answer>"  # the calculator notes go whole
    assert accuracy_reward("<answer>0.75</answer>", ps[2]) == 1.0
    task = get_task("jsonl:" + f)
    n_train = sum(split_of(p.question) == "train" for p in ps)
    assert len(task.problems(n_train, seed=0)) == n_train
    with pytest.raises(ValueError, match="asked for"):
        task.problems(n_train + 1, seed=0)


@pytest.mark.parametrize("line, msg", [
    ('{"question": "a", "answer": "1"', "invalid JSON"),
    ('["question", "answer"]', "expected a JSON object"),
    ('{"answer": "1"}', "missing or empty 'question'"),
    ('{"question": "a"}', "missing 'answer'"),
    ('{"question": "a", "answer": ""}', "missing 'answer'"),
    ('{"problem": "a", "solution": "no box here"}', "missing 'answer'"),
    ('{"question": "a", "answer": NaN}', "finite number"),  # json.loads takes NaN: 'nan' == 'nan' verified
    ('{"question": "a", "answer": -Infinity}', "finite number"),
    ('{"question": "ok", "answer": "2"}', "the question of line 1 again, with another answer"),
    ('{"question": "c", "answer": "1", "checker": "countdown", "meta": {"numbers": ["1", 2], "target": 3}}',
     "list of ints"),
    ('{"question": "c", "checker": "code"}', "checker 'code' needs 'tests'"),
    ('{"question": "a", "answer": ' + "1" * 5000 + "}", "cannot be read .Exceeds the limit"),  # had no file:line
    ("[" * 100_000 + "]" * 100_000, "cannot be read .nested too deeply"),  # a RecursionError traceback
    ('{"question": "a", "answer": [1, 2]}', "'answer' must be a string or a number, got list"),  # said "missing"
    ('{"question": "a", "answer": true}', "'answer' must be a string or a number, got bool"),
])
def test_jsonl_errors_name_file_and_line(tmp_path, line, msg):
    f = _write(tmp_path / "bad.jsonl", ['{"question": "ok", "answer": "1"}', "", line])
    with pytest.raises(ValueError, match=msg) as e:
        load_jsonl(f)
    assert f"{f}:3:" in str(e.value)


def test_jsonl_with_a_byte_order_mark(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"question": "1+1", "answer": "2"}\n')  # was: line 1 invalid JSON
    assert [p.answer for p in load_jsonl(str(path))] == ["2"]


def test_jsonl_missing_and_empty(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        load_jsonl(str(tmp_path / "nope.jsonl"))
    with pytest.raises(ValueError, match="empty"):
        load_jsonl(_write(tmp_path / "e.jsonl", [""]))


def test_reasoning_gym_optional():
    try:
        import reasoning_gym  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="reasoning-gym"):
            get_task("rg:basic_arithmetic")
        return
    ps = get_task("rg:basic_arithmetic").problems(5, seed=0)
    assert len(ps) == 5 and all(isinstance(p, Problem) for p in ps)
    # a task mix's step can draw none of it: that raised "only 458 distinct train problems for n=0"
    assert get_task("rg:basic_arithmetic").problems(0, seed=0) == []


def test_jsonl_invalid_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"question": "1+1", "answer": "2"}\n{"question": "\xff1+2", "answer": "3"}\n')
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}:2: invalid UTF-8"):
        load_jsonl(str(path))
    path.write_text('{"question": "1+1 \\ud800", "answer": "2"}\n')  # valid JSON, a lone surrogate
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}:1: 'question' is not valid Unicode"):
        load_jsonl(str(path))


def test_jsonl_code_problems_run_their_tests(tmp_path):
    """checker 'code': the response's last ```python block runs against the line's tests in the sandbox."""
    f = _write(tmp_path / "code.jsonl", [
        json.dumps({"question": "Write add(a, b).", "checker": "code", "tests": "assert add(2, 3) == 5"}),
        json.dumps({"question": "Write neg(x).", "checker": "code", "meta": {"tests": "assert neg(2) == -2"}}),
        json.dumps({"question": "Same question, same tests.", "checker": "code", "tests": "assert True"}),
        json.dumps({"question": "Same question, same tests.", "checker": "code", "tests": "assert True"}),
    ])
    ps = load_jsonl(f)
    good = "<think>easy</think><answer>```python\ndef add(a, b):\n    return a + b\n```</answer>"
    bad = good.replace("a + b", "a - b")
    cheat = "<think>x</think><answer>```python\nimport sys\nsys.exit(0)\n```</answer>"
    assert [accuracy_reward(r, ps[0]) for r in (good, bad, cheat)] == [1.0, 0.0, 0.0]
    assert accuracy_reward("<answer>```python\ndef neg(x):\n    return -x\n```</answer>", ps[1]) == 1.0
    # the guard against objects that equal anything (rl/sandbox.py), and its opt-out for tests that compare
    # objects of the solution's own classes
    hack = "<answer>```python\nclass A:\n    __eq__ = lambda s, o: True\ndef add(a, b):\n    return A()\n```</answer>"
    assert accuracy_reward(hack, ps[0]) == 0.0
    f2 = _write(tmp_path / "obj.jsonl", [
        json.dumps({"question": "Write P(v) with equality by v.", "checker": "code", "tests": "assert make(1) == P(1)",
                    "meta": {"plain_returns": False}}),
        json.dumps({"question": "Another.", "checker": "code", "tests": "assert make(1) == P(1)"})])
    obj = ("<answer>```python\nclass P:\n    def __init__(self, v):\n        self.v = v\n"
           "    def __eq__(self, o):\n        return self.v == o.v\ndef make(v):\n    return P(v)\n```</answer>")
    opt_out, guarded = load_jsonl(f2)
    assert accuracy_reward(obj, opt_out) == 1.0 and accuracy_reward(obj, guarded) == 0.0
    bad = _write(tmp_path / "bad.jsonl", [json.dumps({"question": "q", "checker": "code", "tests": "assert 1",
                                                       "meta": {"plain_returns": "no"}})])
    with pytest.raises(ValueError, match="meta.plain_returns must be true or false"):
        load_jsonl(bad)


# ----------------------------------------------------------------------------- reasoning-gym's scorers, sandboxed
def _rg_problem(name, seed=0):
    pytest.importorskip("reasoning_gym")
    return get_task(f"rg:{name}").problems(1, seed=seed)[0]


@pytest.mark.parametrize("name", ["basic_arithmetic", "string_insertion", "polynomial_multiplication", "n_queens"])
def test_reasoning_gym_scores_its_answers_in_the_worker(name):
    """The worker scores the trainer's own entry (polynomial_multiplication's entries differ between
    processes, so a regenerated one would not match the question)."""
    p = _rg_problem(name)
    assert accuracy_reward(f"<answer>{p.answer}</answer>", p) == 1.0
    assert accuracy_reward("<answer>certainly not the answer</answer>", p) == 0.0


def test_reasoning_gym_scorer_eval_cannot_touch_the_machine(tmp_path):
    """string_insertion's scorer eval()s a wrong answer: in the trainer's process this one would have
    created the files."""
    p = _rg_problem("string_insertion")
    for attack in [f"__import__('os').system('touch {tmp_path}/a')", f"open('{tmp_path}/b', 'w').write('x')",
                   f"__import__('subprocess').run(['touch', '{tmp_path}/c'])"]:
        assert accuracy_reward(f"<answer>{attack}</answer>", p) == 0.0
    assert list(tmp_path.iterdir()) == []


def test_reasoning_gym_scorer_hang_is_cut(monkeypatch):
    """With the scorer's own eval() (as reasoning-gym ships it), a power tower never returns: the worker
    is killed at the timeout and the next answer gets a fresh one."""
    from reasonrl.rl import rgscore
    p = _rg_problem("string_insertion")
    w = rgscore.worker()
    w._kill()
    monkeypatch.setattr(rgscore, "_WORKER", rgscore._WORKER.replace(repr(rgscore._EVAL_MODULES), "()"))
    try:
        assert accuracy_reward(f"<answer>{p.answer}</answer>", p) == 1.0  # started, dataset built
        before, t = w.restarts, time.perf_counter()
        assert p.meta["score"]("9**9**9**9", p.meta) == 0.0  # eval() of a power tower: never returns
        assert time.perf_counter() - t < 3.0 + 2.0 and w.restarts == before + 1
        assert accuracy_reward(f"<answer>{p.answer}</answer>", p) == 1.0  # a fresh worker
    finally:
        w._kill()  # the next test starts the shipped worker


def test_reasoning_gym_answers_are_parsed_not_run():
    """string_insertion's scorer eval()'d the answer in the worker: an answer could write a forged score
    to the reply pipe (its descriptor is in sys.argv), desynchronising every later reply, or rebind
    float for every later answer (wrong answers then scored 1.0)."""
    from reasonrl.rl import rgscore
    p, q = _rg_problem("string_insertion"), _rg_problem("string_insertion", seed=1)
    forge = "[__import__('os').write(int(__import__('sys').argv[1]), b'1.0\\n')][0:0]"
    patch = "[__import__('builtins').__setattr__('float', lambda *a: 1)][0:0]"
    assert q.meta["score"](q.answer, q.meta) == 1.0  # the worker is up
    w = rgscore.worker()
    before = w.restarts
    for answer in (forge, patch, "9**9**9**9"):
        assert p.meta["score"](answer, p.meta) == 0.0, answer
        assert q.meta["score"]("nonsense", q.meta) == 0.0 and q.meta["score"](q.answer, q.meta) == 1.0
    assert w.restarts == before  # parsed, not run: no timeout, no tampered reply
    assert not rgscore._one_score("1.0\n0.0") and not rgscore._one_score("x") and rgscore._one_score("0.5")


def test_reasoning_gym_scorer_error_scores_zero_and_warns():
    p = _rg_problem("prime_factorization")
    from reasonrl.rl import rgscore
    rgscore.worker().warned.discard("prime_factorization")
    with pytest.warns(RuntimeWarning, match="prime_factorization: its scorer raised"):
        assert p.meta["score"]("not a factorization", p.meta) == 0.0


def test_reasoning_gym_first_answer_of_a_dataset_has_the_answer_timeout():
    """A new dataset (every step's problems are one) is built before its first answer is sent, so an
    answer that hangs is cut at the answer's timeout even when it comes first; a worker that died
    between answers is replaced."""
    from reasonrl.rl import rgscore
    w = rgscore.worker()
    p = _rg_problem("string_insertion", seed=11)
    t = time.perf_counter()
    assert p.meta["score"]("9**9**9**9", p.meta) == 0.0
    assert time.perf_counter() - t < 3.0 + 4.0  # the answer's 3 s, a worker start and a dataset build
    assert p.meta["score"](p.answer, p.meta) == 1.0
    w.proc.kill()
    w.proc.wait()
    assert p.meta["score"](p.answer, p.meta) == 1.0


def test_reasoning_gym_worker_that_cannot_start_says_why(monkeypatch):
    pytest.importorskip("reasoning_gym")
    from reasonrl.rl import rgscore
    monkeypatch.setattr(rgscore, "_WORKER", rgscore._WORKER.replace("import reasoning_gym ", "import no_such_module_q "))
    w = rgscore.ScoringWorker()
    with pytest.raises(RuntimeError, match="did not start: ModuleNotFoundError: No module named 'no_such_module_q'"):
        w.score(("basic_arithmetic", 8, 0, {}), {}, "1", 1.0)
    assert w.proc is None and w.workdir is None


def test_reasoning_gym_worker_cleans_up_after_a_killed_trainer():
    """SIGKILL leaves no atexit: the worker sees its stdin close, removes its directory and exits."""
    pytest.importorskip("reasoning_gym")
    import subprocess
    import sys
    code = ("import os\nfrom reasonrl.rl import rgscore\nfrom reasonrl.rl.tasks import get_task\n"
            "p = get_task('rg:basic_arithmetic').problems(1, seed=0)[0]\n"
            "assert p.meta['score'](p.answer, p.meta) == 1.0\n"
            "print(rgscore.worker().workdir, flush=True)\nos.kill(os.getpid(), 9)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    workdir = out.stdout.strip()
    assert out.returncode == -9 and workdir.startswith("/"), out.stderr[-2000:]
    deadline = time.monotonic() + 10
    while os.path.exists(workdir) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not os.path.exists(workdir)


def test_reasoning_gym_unknown_dataset_fails_at_get_task():
    pytest.importorskip("reasoning_gym")
    with pytest.raises(ValueError, match=r"reasoning-gym has no dataset 'basic_arithmetik' \(close: basic_arithmetic"):
        get_task("rg:basic_arithmetik")


def test_reasoning_gym_sympy_parse_of_answers_is_guarded():
    """countdown, puzzle24, polynomial_multiplication and the integration sets give the answer to sympy's
    parse_expr, itself an eval(): an answer could import os and write a forged score to the reply pipe."""
    from reasonrl.rl import rgscore
    p = _rg_problem("countdown")
    assert accuracy_reward(f"<answer>{p.answer}</answer>", p) == 1.0
    w = rgscore.worker()
    before = w.restarts
    # eval() of a plain string: sympy's transformations do not reach inside it
    forge = "__import__('builtins').eval(\"__import__('os').write(int(__import__('sys').argv[1]), b'1.0\\\\n')\")"
    for answer in (forge, "(1).__class__", "x.func", "(lambda: 1)()"):
        assert p.meta["score"](answer, p.meta) < 1.0, answer
    assert accuracy_reward(f"<answer>{p.answer}</answer>", p) == 1.0 and w.restarts == before
    q = _rg_problem("polynomial_multiplication")
    assert accuracy_reward(f"<answer>{q.answer}</answer>", q) == 1.0  # plain expressions still parse


def test_arithmetic_answers_must_be_numbers_not_the_question():
    """sympy finds "560*5" equal to 2800, so an answer that repeated the question scored full accuracy on
    multiply and add (1.000 on the default run's 500 held-out problems, 2026-11-30): their checker is
    "number" now. A plain number in any accepted form still counts."""
    for task in (get_task("multiply"), get_task("add")):
        for p in task.problems(30, seed=3):
            assert p.checker == "number"
            a, op, b = p.question.partition("*" if task.name == "multiply" else "+")
            for echo in (p.question, f"{a}\\times {b}" if op == "*" else f"{b}+{a}", f"({p.question})"):
                assert accuracy_reward(f"<think></think><answer>{echo}</answer>", p) == 0.0, echo
            for ok in (p.answer, f"{int(p.answer):,}", f"\\boxed{{{p.answer}}}", f"{p.answer}.0"):
                assert accuracy_reward(f"<think></think><answer>{ok}</answer>", p) == 1.0, ok


def test_add_operand_swaps_stay_in_one_split():
    """The split hashed the question text, so b+a of a held-out a+b was a training problem (751 of 834
    held-out 2-digit sums, 2026-11-30); add's split key is the sum with its operands ordered."""
    task = get_task("add", 2)
    test = {p.question for p in task.problems(400, seed=0, split="test")}
    train = {p.question for s in range(3) for p in task.problems(2000, seed=s, split="train")}
    swapped = {"+".join(reversed(q.split("+"))) for q in test}
    assert not swapped & train


def test_countdown_difficulty_one_is_refused_and_mix_difficulty_is_preflighted():
    """countdown at difficulty 1 made the same problems as 2 without a word; a mix's difficulty was checked
    only when its stage started, after the stages before it trained (2026-11-30)."""
    from reasonrl.train.common import preflight
    from reasonrl.train.config import GRPOConfig

    with pytest.raises(ValueError, match=r"countdown' takes 2..12, got 1"):
        get_task("countdown", 1)
    assert len(get_task("countdown", 2).problems(3, seed=0)[0].meta["numbers"]) == 2
    with pytest.raises(ValueError, match=r"mt\.tasks: difficulty: task .countdown. takes 2..12, got 20"):
        preflight([("mt", GRPOConfig(tasks="multiply=0.7;countdown=0.3", difficulty=20))], "tiny")


def test_jsonl_gsm8k_math500_and_precise_numbers(tmp_path):
    """GSM8K's calculator notes went half (48/2 = 48/2=2424), MATH-500's shape (answer and solution)
    lost its worked solution, a numeric answer lost digits as a float, and a MATH answer with \\$ could not
    be matched (2026-11-30)."""
    f = _write(tmp_path / "d.jsonl", [
        json.dumps({"question": "q1", "answer": "She sold 48/2 = <<48/2=24>>24 clips.\n#### 24"}),
        json.dumps({"problem": "q2", "solution": "So $\\boxed{5}$.", "answer": "5"}),
        '{"question": "q3", "answer": 0.30000000000000000001}',
        json.dumps({"question": "q4", "answer": "\\$18.90"}),
    ])
    ps = load_jsonl(f)
    assert ps[0].solution == "<think>She sold 48/2 = 24 clips.</think><answer>24</answer>"
    assert ps[1].solution == "<think>So $\\boxed{5}$.</think><answer>5</answer>"
    assert ps[2].answer == "0.30000000000000000001"
    assert accuracy_reward("<answer>0.30000000000000000001</answer>", ps[2]) == 1.0
    assert accuracy_reward("<answer>0.3</answer>", ps[2]) == 0.0
    for ans in ("18.90", "$18.90", "\\$18.90", "18.9"):
        assert accuracy_reward(f"<answer>{ans}</answer>", ps[3]) == 1.0, ans


def test_reasoning_gym_held_out_sets_and_puzzle24():
    """rg held-out sets of the eval's sizes (100 and more) could not be drawn: 4n + 64 entries held ~n/2.5
    of them (2026-11-30). puzzle24's upstream scorer took any four numbers that make 24, so a constant
    answer scored 1.0; its problems are scored by the exact countdown check on their own numbers now."""
    pytest.importorskip("reasoning_gym")
    assert len(get_task("rg:basic_arithmetic").problems(200, seed=1, split="test")) == 200
    for p in get_task("rg:puzzle24").problems(5, seed=0):
        assert p.checker == "countdown" and p.meta["target"] == 24
        assert accuracy_reward(f"<answer>{p.answer}</answer>", p) == 1.0
        assert accuracy_reward("<answer>6*4*1*1</answer>", p) == 0.0


def test_sampled_reasoning_gym_problems_without_an_answer_read_back_unverifiable(tmp_path):
    """A scorer's problem with no single answer was written as checker "math" with answer 'None', so read
    back "<answer>None</answer>" scored 1.0 (2026-11-30); it reads back as "none" (nothing to verify)."""
    from reasonrl.train.sample import _record

    rec = _record(Problem("color this graph", "None", None, "score", {"entry": {}, "score": None}), "r", {})
    f = _write(tmp_path / "s.jsonl", [json.dumps(rec)])
    (p,) = load_jsonl(f)
    assert p.checker == "none" and accuracy_reward("<answer>None</answer>", p) == 0.0
