"""Reasoning tasks: built-in generators with a difficulty knob, local JSONL datasets, reasoning-gym.

A task makes `Problem`s: a question, a final answer, and (built-in tasks) a worked response in the
training format <think>...</think><answer>...</answer> for the cold start.

Splits. A question belongs to the held-out split when a hash of its text falls in the first
`test_percent` of 100 buckets; where two texts are one problem (add's a+b and b+a), of a canonical
form of it (meta["split_key"]). Because the split is a function of the question alone, the training
and held-out problems can never share a question, whatever seeds or counts are used.
Generation is deterministic by seed (a private random.Random; global RNGs are left alone).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
from dataclasses import dataclass, field

from reasonrl.rl import rgscore
from reasonrl.rl.rewards import extract_boxed


@dataclass
class Problem:
    question: str
    answer: str
    solution: str | None = None  # worked response in the training format, when known
    checker: str = "math"        # how rewards.accuracy_reward verifies: math | number | countdown | score | code
    meta: dict = field(default_factory=dict)


def split_of(question: str, test_percent: int = 10) -> str:
    """'test' or 'train', from a hash of the question text (stable across runs and machines)."""
    bucket = int.from_bytes(hashlib.sha1(question.encode()).digest()[:4], "little") % 100
    return "test" if bucket < test_percent else "train"


def format_response(think: str, answer: str) -> str:
    return f"<think>{think}</think><answer>{answer}</answer>"


class Task:
    """Base: subclasses implement sample(rng) -> Problem."""
    name = "task"
    test_percent = 10

    def sample(self, rng: random.Random) -> Problem:
        raise NotImplementedError

    def problems(self, n: int, seed: int, split: str = "train", exclude=()) -> list[Problem]:
        """n distinct problems of the split, deterministic by seed; questions in `exclude` skipped."""
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        rng, seen, out = random.Random(f"{self.name}:{seed}:{split}"), set(exclude), []
        tries = 0
        while len(out) < n:
            tries += 1
            if tries > 200 * n + 1000:
                raise ValueError(f"task {self.name}: could not find {n} distinct {split} problems "
                                 f"(found {len(out)}); widen the difficulty range")
            p = self.sample(rng)
            if p.question in seen or split_of(p.meta.get("split_key", p.question), self.test_percent) != split:
                continue
            seen.add(p.question)
            out.append(p)
        return out


def _digits(rng: random.Random, lo: int, hi: int) -> int:
    d = rng.randint(lo, hi)
    return rng.randint(10 ** (d - 1), 10 ** d - 1)


class MultiplyTask(Task):
    """a*b, a of `digits` digits, b of `b_digits` digits (default b in 2..9, benchmarks/RESULTS.md).

    Worked solution, right to left, one partial product and carry per step ("7*6+4=46" means
    digit 7 of a times b plus the carry 4); the last step's result leads the answer:
    347*6 -> <think>7*6=42,4*6+4=28,3*6+2=20</think><answer>2082</answer>.
    Difficulty knob: `digits` (min, max) of a."""
    name = "multiply"

    def __init__(self, digits=(2, 5), b_digits=(1, 1), b_min=2):
        if not (1 <= digits[0] <= digits[1]):
            raise ValueError(f"MultiplyTask: digits must be (min, max) with 1 <= min <= max, got {digits}")
        if not (1 <= b_digits[0] <= b_digits[1]):
            raise ValueError(f"MultiplyTask: b_digits must be (min, max) with 1 <= min <= max, got {b_digits}")
        self.digits, self.b_digits, self.b_min = tuple(digits), tuple(b_digits), b_min

    def sample(self, rng):
        a = _digits(rng, *self.digits)
        # one-digit b skips 0 and 1 (trivial steps) by default
        b = rng.randint(self.b_min, 9) if self.b_digits == (1, 1) else _digits(rng, *self.b_digits)
        steps, carry = [], 0
        for d in reversed(str(a)):
            v = int(d) * b + carry
            steps.append(f"{d}*{b}" + (f"+{carry}" if carry else "") + f"={v}")
            carry = v // 10
        # "number": the answer must be a plain number; sympy finds "{a}*{b}", the question, equal to it
        return Problem(f"{a}*{b}", str(a * b), format_response(",".join(steps), str(a * b)), "number")


class AddTask(Task):
    """a+b with each operand of `digits` digits; worked right to left, one column and carry per step:
    57+68 -> <think>7+8=15,5+6+1=12</think><answer>125</answer>."""
    name = "add"

    def __init__(self, digits=(2, 5)):
        if not (1 <= digits[0] <= digits[1]):
            raise ValueError(f"AddTask: digits must be (min, max) with 1 <= min <= max, got {digits}")
        self.digits = tuple(digits)

    def sample(self, rng):
        a, b = _digits(rng, *self.digits), _digits(rng, *self.digits)
        sa, sb = str(a), str(b)
        width = max(len(sa), len(sb))
        sa, sb = sa.zfill(width), sb.zfill(width)
        steps, carry = [], 0
        for x, y in zip(reversed(sa), reversed(sb)):
            v = int(x) + int(y) + carry
            steps.append(f"{x}+{y}" + (f"+{carry}" if carry else "") + f"={v}")
            carry = v // 10
        return Problem(f"{a}+{b}", str(a + b), format_response(",".join(steps), str(a + b)), "number",
                       {"split_key": f"{min(a, b)}+{max(a, b)}"})


class CountdownTask(Task):
    """Reach a target with the given numbers, each used once, with + - * / (exact division only).
    The reward checks the expression's numbers and value (rewards.countdown_check, no eval).
    Difficulty knob: `count` numbers in 1..`max_number`."""
    name = "countdown"

    def __init__(self, count=4, max_number=25):
        if count < 2:
            raise ValueError(f"CountdownTask: count must be >= 2, got {count}")
        if max_number < 2:
            raise ValueError(f"CountdownTask: max_number must be >= 2, got {max_number}")
        self.count, self.max_number = count, max_number

    def sample(self, rng):
        while True:
            nums = [rng.randint(1, self.max_number) for _ in range(self.count)]
            expr, value, steps = str(nums[0]), nums[0], []
            for n in nums[1:]:
                op = rng.choice("+-*/")
                if op == "/" and (n == 0 or value % n):
                    op = "+"
                new = {"+": value + n, "-": value - n, "*": value * n, "/": value // n}[op]
                steps.append(f"{value}{op}{n}={new}")
                expr, value = f"({expr}{op}{n})", new
            if value > 0:
                break
        expr = expr[1:-1] if expr.startswith("(") else expr
        question = f"Use {' '.join(map(str, sorted(nums)))} to make {value}"
        return Problem(question, expr, format_response(",".join(steps), expr), "countdown",
                       {"numbers": nums, "target": value})


class JsonlTask(Task):
    """A local JSONL dataset, one problem per line. Accepted shapes:
    {"question", "answer"}; GSM8K {"question", "answer": "... #### 42"}; MATH {"problem",
    "solution" with \\boxed{}} (or an explicit "answer"). An optional "response" in the training
    format is used as the worked solution for SFT (what `reasonrl sample` writes); optional
    "checker" ("math" | "countdown" | "none" | "code") and "meta" (e.g. countdown's numbers and target)
    say how rewards.accuracy_reward verifies an answer (default: math equivalence; "number": a plain
    number only, no expression, as the built-in arithmetic tasks, whose question sympy would find equal
    to its answer). "none" marks
    open-ended prompts with no answer to verify (the helpfulness side of a mix, scored by an
    "rm:FOLDER" reward); their "answer" may be omitted and their accuracy is 0. "code" runs the
    response's last ```python block against the line's "tests" (or meta.tests: plain asserts) in the
    sandbox (rl/sandbox.py), whose functions must return plain data (meta "plain_returns": false for
    tests that compare objects of the solution's classes); "answer" may be omitted. A question given twice must have one answer."""

    def __init__(self, path: str):
        self.path, self.name = path, f"jsonl:{os.path.basename(path)}"
        self.items = load_jsonl(path)
        self.test_percent = 10

    def problems(self, n, seed, split="train", exclude=()):
        exclude = exclude if isinstance(exclude, (set, frozenset)) else set(exclude)  # was built per item
        pool = [p for p in self.items if split_of(p.question, self.test_percent) == split and p.question not in exclude]
        if n > len(pool):
            raise ValueError(f"{self.path}: asked for {n} {split} problems, the file has {len(pool)}")
        return random.Random(f"{self.name}:{seed}:{split}").sample(pool, n)


def _jsonl_problem(obj, where: str) -> Problem:
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    question = obj.get("question", obj.get("problem"))
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"{where}: missing or empty 'question' (or 'problem') string")
    answer, rationale = obj.get("answer"), None
    if isinstance(answer, str) and "####" in answer:  # GSM8K: rationale #### final
        rationale, answer = answer.rsplit("####", 1)
        rationale = re.sub(r"<<[^<>]*>>", "", rationale)  # calculator annotations: "48/2 = <<48/2=24>>24"
    if isinstance(obj.get("solution"), str) and rationale is None:  # MATH (MATH-500 gives "answer" too)
        rationale = obj["solution"]
        if answer is None:
            answer = extract_boxed(obj["solution"])
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        if not math.isfinite(answer):  # json.loads takes NaN and Infinity: 'nan' verified equal to 'nan'
            raise ValueError(f"{where}: 'answer' must be a finite number, got {answer}")
        answer = str(answer)
    if answer is None and obj.get("checker") in ("none", "code"):  # scored by a reward model / by its tests
        answer = ""
    elif answer is not None and not isinstance(answer, str):
        raise ValueError(f"{where}: 'answer' must be a string or a number, got {type(answer).__name__} {answer!r:.60}")
    elif not isinstance(answer, str) or not answer.strip():
        raise ValueError(f"{where}: missing 'answer' (a string or number, '#### x', or a \\boxed{{}} solution)")
    answer = answer.strip()
    for key, text in (("question", question), ("answer", answer), ("response", obj.get("response"))):
        if isinstance(text, str):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ValueError(f"{where}: {key!r} is not valid Unicode text ({e.reason} at character {e.start})") from None
    solution = obj.get("response")
    if solution is None and rationale is not None:
        solution = format_response(rationale.strip(), answer)
    if solution is not None and not isinstance(solution, str):
        raise ValueError(f"{where}: 'response' must be a string")
    checker, meta = obj.get("checker", "math"), obj.get("meta", {})
    if checker not in JSONL_CHECKERS:
        raise ValueError(f"{where}: 'checker' must be one of {JSONL_CHECKERS}, got {checker!r}")
    if not isinstance(meta, dict):
        raise ValueError(f"{where}: 'meta' must be a JSON object")
    def _int(x):
        return isinstance(x, int) and not isinstance(x, bool)
    if checker == "countdown" and not (isinstance(meta.get("numbers"), list) and meta["numbers"]
                                       and all(_int(x) for x in meta["numbers"]) and _int(meta.get("target"))):
        raise ValueError(f"{where}: checker 'countdown' needs meta.numbers (a non-empty list of ints) and "
                         "meta.target (an int)")
    if checker == "code":
        if "tests" in obj and "tests" not in meta:
            meta = {**meta, "tests": obj["tests"]}
        if not isinstance(meta.get("tests"), str) or not meta["tests"].strip():
            raise ValueError(f"{where}: checker 'code' needs 'tests' (or meta.tests): Python asserts that the "
                             "answer's code must pass, run in the sandbox (rl/sandbox.py)")
        if not isinstance(meta.get("plain_returns", True), bool):
            raise ValueError(f"{where}: meta.plain_returns must be true or false, got {meta['plain_returns']!r}")
    return Problem(question.strip(), answer, solution, checker, meta)


# plain-JSON checkers; "number": a plain number, not an expression; "none": no verifiable answer; "code": the response's last ```python block (or its
# answer) runs against the line's tests in rl/sandbox.py
JSONL_CHECKERS = ("math", "number", "countdown", "none", "code")


def load_jsonl(path: str) -> list[Problem]:
    """Problems from a JSONL file; a malformed line raises ValueError naming the file and line."""
    if not os.path.isfile(path):
        raise ValueError(f"dataset {path!r}: no such file")
    out, seen = [], {}  # question -> (line, answer)
    try:
        with open(path, encoding="utf-8-sig") as f:  # -sig: a leading byte-order mark (Windows editors) is skipped
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
                except (ValueError, RecursionError) as e:  # a number past int()'s 4300 digits; deep nesting
                    why = "nested too deeply" if isinstance(e, RecursionError) else str(e).split(";")[0]
                    raise ValueError(f"{where}: JSON that cannot be read ({why})") from None
                if isinstance(obj, dict) and isinstance(obj.get("answer"), float):  # its digits as written:
                    obj["answer"] = json.loads(line, parse_float=str)["answer"]  # 0.30000000000000000001 != 0.3
                p = _jsonl_problem(obj, where)
                if p.question in seen and seen[p.question][1] != (p.answer, p.checker):
                    raise ValueError(f"{where}: the question of line {seen[p.question][0]} again, with another "
                                     f"answer ({p.answer!r} against {seen[p.question][1][0]!r}): which is right?")
                seen.setdefault(p.question, (lineno, (p.answer, p.checker)))
                out.append(p)
    except UnicodeDecodeError as e:  # decoded in blocks: find the line in the raw bytes
        raise ValueError(f"{_bad_utf8_line(path)}: invalid UTF-8 ({e.reason}); the file must be UTF-8 text") from None
    if not out:
        raise ValueError(f"dataset {path!r}: no problems (empty file)")
    return out


def _bad_utf8_line(path: str) -> str:
    """'PATH:LINE' of the first line that is not valid UTF-8 (PATH alone if none is found)."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                return f"{path}:{lineno}"
    return path


class ReasoningGymTask(Task):
    """A reasoning-gym generator (optional package `reasoning-gym`), scored by its own scorer, which runs
    in a sandboxed worker process on model output (reasonrl/rl/rgscore.py)."""

    def __init__(self, dataset: str, **kwargs):
        try:
            import reasoning_gym
        except ImportError as e:
            raise ImportError("task 'rg:...' needs the optional package reasoning-gym "
                              "(pip install 'reasonrl[tasks]')") from e
        self.rg, self.dataset, self.kwargs, self.name = reasoning_gym, dataset, kwargs, f"rg:{dataset}"
        known = getattr(getattr(reasoning_gym, "factory", None), "DATASETS", None)  # its registry, where it has one
        if isinstance(known, dict) and dataset not in known:  # a typo fails here, not after an SFT stage
            import difflib
            close = difflib.get_close_matches(dataset, list(known), n=3)
            raise ValueError(f"task {self.name!r}: reasoning-gym has no dataset {dataset!r}"
                             + (f" (close: {', '.join(close)})" if close else f" ({len(known)} are registered)"))

    def problems(self, n, seed, split="train", exclude=()):
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        # Oversample, then keep this split's questions: the hash rule keeps splits disjoint here too. The
        # split holds test_percent of the questions (or the rest): 1.5x the entries that share needs, so that
        # a held-out set of 100 is there (4n + 64 entries gave 39 test problems for n = 100); larger where
        # duplicate questions leave too few, up to 8x.
        if n <= 0:  # a mix's step that draws none of this task (it drew 458 then found none equal to 0)
            return []
        share = (self.test_percent if split == "test" else 100 - self.test_percent) / 100
        base = math.ceil(1.5 * n / share) + 64
        for size in (base, 2 * base, 8 * base):
            out = self._draw(n, seed, split, exclude, size)
            if len(out) == n:
                return out
        raise ValueError(f"task {self.name}: only {len(out)} distinct {split} problems for n={n} "
                         f"(from {size} generated); ask for fewer")

    def _draw(self, n, seed, split, exclude, size):
        ds = self.rg.create_dataset(self.dataset, size=size, seed=seed, **self.kwargs)
        # Scored in a sandboxed worker process (rgscore.py): some of reasoning-gym's scorers eval() the answer.
        spec = (self.dataset, size, seed, self.kwargs)
        out, seen = [], set(exclude)
        for entry in ds:
            q = entry["question"]
            if q in seen or split_of(q, self.test_percent) != split:
                continue
            seen.add(q)
            nums = entry.get("metadata", {}).get("numbers")
            if self.dataset == "puzzle24" and isinstance(nums, list) and all(type(x) is int for x in nums):
                # reasoning-gym's puzzle24 scorer checks that four numbers make 24, not that they are the
                # problem's: "6*4*1*1" scored 1.0 on every problem (reasoning-gym 0.1.x). The countdown
                # check is exact: these numbers, each once, and the value 24.
                out.append(Problem(q, str(entry["answer"]), None, "countdown", {"numbers": nums, "target": 24}))
            else:
                meta = {"entry": entry, "score": lambda pred, m, spec=spec: rgscore.score(spec, m["entry"], pred)}
                out.append(Problem(q, str(entry["answer"]), None, "score", meta))
            if len(out) == n:
                break
        return out


BUILTIN = {"multiply": MultiplyTask, "add": AddTask, "countdown": CountdownTask}
# Largest difficulty each built-in takes: operands of up to 1000 digits (products stay under Python's
# 4300-digit int/str limit), up to 12 numbers in countdown.
MAX_DIFFICULTY = {"multiply": 1000, "add": 1000, "countdown": 12}
MIN_DIFFICULTY = {"multiply": 1, "add": 1, "countdown": 2}  # countdown: at least two numbers


def get_task(name: str, difficulty: int | None = None) -> Task:
    """'multiply' | 'add' | 'countdown' | 'jsonl:PATH' | 'rg:DATASET'. `difficulty` (built-ins):
    the largest operand's digit count (multiply, add) or how many numbers (countdown)."""
    if difficulty is not None and (name.startswith(("jsonl:", "rg:")) or name.endswith(".jsonl")):
        print(f"note: task {name!r} has no difficulty knob; difficulty={difficulty} does not apply to it")
    if name.startswith("jsonl:"):
        return JsonlTask(name[len("jsonl:"):])
    if name.endswith(".jsonl"):
        return JsonlTask(name)
    if name.startswith("rg:"):
        return ReasoningGymTask(name[3:])
    if name not in BUILTIN:
        raise ValueError(f"task {name!r}: expected one of {sorted(BUILTIN)}, 'jsonl:PATH' or 'rg:DATASET'")
    if difficulty is None:
        return BUILTIN[name]()
    low, top = MIN_DIFFICULTY[name], MAX_DIFFICULTY[name]
    if not low <= difficulty <= top:
        raise ValueError(f"difficulty: task {name!r} takes {low}..{top}, got {difficulty}")
    if name == "countdown":
        return CountdownTask(count=difficulty)
    return BUILTIN[name](digits=(min(2, difficulty), difficulty))


def parse_task_mix(spec: str) -> list[tuple[str, float, str | None]]:
    """A multi-task mix: "TASK=WEIGHT[|REWARDS]" entries joined by ';' -> [(task, weight, rewards)].

    e.g. "multiply=0.6;countdown=0.4|accuracy:1.0,format:0.1;jsonl:help.jsonl=0.2|rm:/models/rm:0.5".
    '=' and ';' keep clear of the ':' inside task names (jsonl:PATH, rg:NAME) and reward specs, and
    '|' of the ',' between rewards. Weights are relative (normalized over the mix); rewards None
    means the run's default spec. Task names are checked here (get_task), so a typo fails early."""
    out, seen = [], set()
    for entry in filter(None, (e.strip() for e in spec.split(";"))):
        head, _, rewards = entry.partition("|")
        name, eq, weight = head.strip().rpartition("=")
        if not eq or not name.strip():
            raise ValueError(f"task mix entry {entry!r}: expected TASK=WEIGHT (optionally |REWARDS)")
        name = name.strip()
        try:
            w = float(weight)
        except ValueError:
            raise ValueError(f"task mix entry {entry!r}: weight {weight.strip()!r} is not a number") from None
        if not (w > 0 and w < float("inf")):
            raise ValueError(f"task mix entry {entry!r}: weight must be a finite number > 0, got {w}")
        if name in seen:
            raise ValueError(f"task mix: task {name!r} appears twice")
        seen.add(name)
        get_task(name)  # raises naming the unknown task or the missing file
        out.append((name, w, rewards.strip() or None))
    if not out:
        raise ValueError(f"task mix {spec!r}: no tasks given (expected e.g. 'multiply=0.6;countdown=0.4')")
    return out
