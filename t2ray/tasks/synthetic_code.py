"""Procedurally generated "write a Python function" tasks (offline, seeded), graded by running
their tests in the sandbox.

* ``code`` (an MBPP stand-in for training an expert): one-line functions (arithmetic with a
  constant, simple string/list operations, predicates), MBPP-style prompt showing one test.
* ``code-hard`` (a HumanEval stand-in, unseen): small algorithms (filters, rotations, chunking,
  Caesar shifts, FizzBuzz variants, primes, duplicates, ...).

Each family provides a reference solution; the expected outputs of the tests are computed by
running that (trusted, package-internal) solution, and the unit tests check every reference
solution passes its own tests in the sandbox.
"""

from __future__ import annotations

import random
import string
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .base import Example
from .common import TRAIN_SIZES, UNSEEN_SIZES, GradedTask, generated_task, pick_family

WORDS = (
    "apple",
    "river",
    "stone",
    "cloud",
    "tiger",
    "green",
    "happy",
    "light",
    "music",
    "paper",
    "sunny",
    "table",
    "water",
    "zebra",
    "bread",
    "chair",
    "dream",
    "earth",
    "flame",
    "grape",
    "house",
    "juice",
    "lemon",
    "mango",
    "night",
    "ocean",
    "piano",
    "queen",
    "robot",
    "snake",
    "bird",
    "candle",
    "dance",
    "forest",
    "garden",
    "honey",
    "island",
    "jacket",
    "kite",
    "ladder",
    "magic",
    "nest",
    "orbit",
    "pepper",
    "quiet",
    "rain",
    "silver",
    "tower",
    "umbrella",
    "violet",
)
SENTENCES = (
    "the quick brown fox",
    "hello world",
    "python is fun",
    "a small red house",
    "we like green apples",
    "the sun is very hot",
    "read a good book today",
    "cats and dogs play",
    "it is a nice day",
    "my name is sam",
)


@dataclass(frozen=True)
class Spec:
    """One generated function task."""

    func: str  # function name
    params: str  # parameter list, e.g. "x" or "a, b"
    desc: str  # "returns ..." sentence fragment
    body: str  # the reference implementation's body, unindented
    inputs: list[tuple[Any, ...]]  # argument tuples for the tests (first one shown in the prompt)

    @property
    def solution(self) -> str:
        """The reference implementation (source)."""
        return f"def {self.func}({self.params}):\n" + textwrap.indent(self.body, "    ")


class Family:
    """Functions that differ only in a few drawn values: ``func``, ``params``, ``desc`` and ``body`` are
    :meth:`str.format` templates whose fields (``{k}``, a letter ``{c}``, a word ``{w}``) are drawn, in the
    order given, from the pools named by keyword; then ``inputs(r, **fields)`` draws the test arguments.
    Without pools, one fixed function whose test arguments are drawn."""

    def __init__(
        self,
        func: str,
        params: str,
        desc: str,
        body: str,
        inputs: Callable[..., list[tuple[Any, ...]]],
        **pools: Sequence[Any],
    ) -> None:
        self.templates = (func, params, desc, body)
        self.inputs = inputs
        self.pools = pools

    def __call__(self, r: random.Random) -> Spec:
        fields = {name: r.choice(pool) for name, pool in self.pools.items()}
        func, params, desc, body = (template.format(**fields) for template in self.templates)
        return Spec(func, params, desc, body, self.inputs(r, **fields))


SpecFamily = Callable[[random.Random], Spec]


def _ints(r: random.Random, n: int, lo: int = -20, hi: int = 50) -> list[int]:
    return [r.randint(lo, hi) for _ in range(n)]


def _lists(r: random.Random, n: int = 3, lo: int = -10, hi: int = 30) -> list[tuple]:
    return [(_ints(r, r.randint(3, 7), lo, hi),) for _ in range(n)]


# Test arguments shared by several families (they ignore the family's fields).


def _int_args(lo: int = -20, hi: int = 50) -> Callable[..., list[tuple]]:
    return lambda r, **_fields: [(v,) for v in _ints(r, 3, lo, hi)]


def _list_args(lo: int = -10, hi: int = 30) -> Callable[..., list[tuple]]:
    return lambda r, **_fields: _lists(r, 3, lo, hi)


def _int_pair_args(r: random.Random, **_fields: Any) -> list[tuple]:
    return [tuple(_ints(r, 2)) for _ in range(3)]


def _word_args(r: random.Random, **_fields: Any) -> list[tuple]:
    return [(w,) for w in r.sample(WORDS, 3)]


def _sentence_args(r: random.Random, **_fields: Any) -> list[tuple]:
    return [(x,) for x in r.sample(SENTENCES, 3)]


# ---- code (training): one-liners ----------------------------------------------------------------

_EASY_FIXED: tuple[SpecFamily, ...] = (
    Family("sum_list", "lst", "returns the sum of the numbers in the list lst", "return sum(lst)", _list_args()),
    Family("max_of_list", "lst", "returns the largest number in the list lst", "return max(lst)", _list_args()),
    Family("min_of_list", "lst", "returns the smallest number in the list lst", "return min(lst)", _list_args()),
    Family("first_element", "lst", "returns the first element of the list lst", "return lst[0]", _list_args()),
    Family("last_element", "lst", "returns the last element of the list lst", "return lst[-1]", _list_args()),
    Family("list_length", "lst", "returns the number of elements in the list lst", "return len(lst)", _list_args()),
    Family("reverse_string", "s", "returns the string s reversed", "return s[::-1]", _word_args),
    Family("to_upper", "s", "returns the string s in upper case", "return s.upper()", _word_args),
    Family("string_length", "s", "returns the length of the string s", "return len(s)", _word_args),
    Family("is_even", "n", "returns True if n is even, otherwise False", "return n % 2 == 0", _int_args()),
    Family("square", "x", "returns the square of x", "return x * x", _int_args()),
    Family(
        "absolute_value",
        "x",
        "returns the absolute value of x",
        "return abs(x)",
        lambda r: [(-r.randint(1, 40),), (5,), (0,)],
    ),
    Family("max_of_two", "a, b", "returns the larger of the two numbers a and b", "return max(a, b)", _int_pair_args),
    Family("first_char", "s", "returns the first character of the string s", "return s[0]", _word_args),
    Family(
        "double_list",
        "lst",
        "returns a new list with every number in lst multiplied by 2",
        "return [x * 2 for x in lst]",
        _list_args(),
    ),
    Family(
        "join_words",
        "a, b",
        "returns the strings a and b joined with a space between them",
        "return a + ' ' + b",
        lambda r: [tuple(r.sample(WORDS, 2)) for _ in range(3)],
    ),
)

_EASY_FAMILIES: tuple[SpecFamily, ...] = (
    Family("add_{k}", "x", "returns x plus {k}", "return x + {k}", _int_args(), k=range(2, 100)),
    Family("multiply_by_{k}", "x", "returns x multiplied by {k}", "return x * {k}", _int_args(), k=range(2, 21)),
    Family("subtract_{k}", "x", "returns x minus {k}", "return x - {k}", _int_args(), k=range(2, 100)),
    Family(
        "is_greater_than_{k}",
        "x",
        "returns True if x is greater than {k}, otherwise False",
        "return x > {k}",
        lambda r, k: [(k + 5,), (k - 3,), (k,)],
        k=range(0, 100),
    ),
    Family(
        "count_{c}",
        "s",
        "returns how many times the letter '{c}' appears in the string s",
        "return s.count('{c}')",
        lambda r, c: [(f"{c}x{c}",), (r.choice(WORDS) + c,), (r.choice(WORDS),)],
        c=string.ascii_lowercase,
    ),
    Family(
        "repeat_{k}_times", "s", "returns the string s repeated {k} times", "return s * {k}", _word_args, k=range(2, 10)
    ),
    Family(
        "is_divisible_by_{k}",
        "n",
        "returns True if n is divisible by {k}, otherwise False",
        "return n % {k} == 0",
        lambda r, k: [(k * r.randint(1, 9),), (k * r.randint(1, 9) + 1,), (r.randint(1, 100),)],
        k=range(2, 21),
    ),
    Family(
        "remainder_by_{k}",
        "n",
        "returns the remainder of n divided by {k}",
        "return n % {k}",
        _int_args(0, 100),
        k=range(2, 21),
    ),
    Family(
        "add_prefix_{w}",
        "s",
        "returns the string '{w}' followed by the string s",
        "return '{w}' + s",
        _word_args,
        w=WORDS,
    ),
    Family(
        "starts_with_{c}",
        "s",
        "returns True if the string s starts with the letter '{c}', otherwise False",
        "return s.startswith('{c}')",
        lambda r, c: [(c + r.choice(WORDS),), (r.choice(WORDS),), ("x" + c,)],
        c=string.ascii_lowercase,
    ),
    Family(
        "contains_{k}",
        "lst",
        "returns True if the number {k} is in the list lst, otherwise False",
        "return {k} in lst",
        lambda r, k: [(_ints(r, 4, 0, 20) + [k],), (_ints(r, 4, 21, 40),), ([k, 1, 2],)],
        k=range(0, 200),
    ),
    Family(
        "length_plus_{k}",
        "s",
        "returns the length of the string s plus {k}",
        "return len(s) + {k}",
        _word_args,
        k=range(2, 51),
    ),
    Family(
        "sum_plus_{k}",
        "a, b",
        "returns the sum of a and b plus {k}",
        "return a + b + {k}",
        _int_pair_args,
        k=range(2, 31),
    ),
    Family(
        "ends_with_{c}",
        "s",
        "returns True if the string s ends with the letter '{c}', otherwise False",
        "return s.endswith('{c}')",
        lambda r, c: [(r.choice(WORDS) + c,), (c + "xy",), (r.choice(WORDS),)],
        c=string.ascii_lowercase,
    ),
    Family(
        "is_equal_to_{k}",
        "x",
        "returns True if x is equal to {k}, otherwise False",
        "return x == {k}",
        lambda r, k: [(k,), (k + 1,), (k - 7,)],
        k=range(0, 51),
    ),
    Family("subtract_from_{k}", "x", "returns {k} minus x", "return {k} - x", _int_args(), k=range(2, 200)),
    Family(
        "add_suffix_{w}",
        "s",
        "returns the string s followed by the string '{w}'",
        "return s + '{w}'",
        _word_args,
        w=WORDS,
    ),
    pick_family(_EASY_FIXED),
)

# Measured on SmolLM2-135M-Instruct (greedy): the base model almost always solves the one-liner
# families except those in _UNSOLVED, which it almost never gets (argument order: "'w' followed by
# s", "k minus x"; membership; letter counting). Trivial families are kept to about a third of
# the mix, so that base accuracy sits at about 40 %, well inside 10-60 % (see the calibration
# notes in SPEC).
_UNSOLVED = {4, 8, 10, 15}  # count_c, add_prefix_w, contains_k, subtract_from_k
_EASY_WEIGHTS = [
    0.58 / len(_UNSOLVED) if i in _UNSOLVED else 0.42 / (len(_EASY_FAMILIES) - len(_UNSOLVED))
    for i in range(len(_EASY_FAMILIES))
]


def _easy_specs(r: random.Random) -> Spec:
    return r.choices(_EASY_FAMILIES, weights=_EASY_WEIGHTS)[0](r)


# ---- code-hard (unseen): small algorithms --------------------------------------------------------


def _replace_reversed(r: random.Random) -> Spec:
    a, b = r.sample(string.ascii_lowercase, 2)
    return Spec(
        f"replace_{a}_with_{b}_reversed",
        "s",
        f"replaces every letter '{a}' in the string s by '{b}' and returns the result reversed",
        f"return s.replace('{a}', '{b}')[::-1]",
        [(w,) for w in r.sample(WORDS, 2)] + [(f"{a}{b}{a}x",)],
    )


def _fizzbuzz(r: random.Random) -> Spec:
    a, b = r.choice([(x, y) for x in range(2, 8) for y in range(2, 8) if x % y and y % x])
    only_a = [a * i for i in range(1, 12) if (a * i) % b]
    only_b = [b * i for i in range(1, 12) if (b * i) % a]
    neither = [n for n in range(1, 60) if n % a and n % b]
    return Spec(
        f"fizzbuzz_{a}_{b}",
        "n",
        f"returns 'FizzBuzz' if n is divisible by both {a} and {b}, 'Fizz' if it is "
        f"divisible only by {a}, 'Buzz' if it is divisible only by {b}, and otherwise "
        f"the number as a string",
        f"if n % {a} == 0 and n % {b} == 0:\n    return 'FizzBuzz'\nif n % {a} == 0:\n    return 'Fizz'\n"
        f"if n % {b} == 0:\n    return 'Buzz'\nreturn str(n)",
        [(a * b * r.randint(1, 3),), (r.choice(only_a),), (r.choice(only_b),), (r.choice(neither),)],
    )


def _every_kth(r: random.Random) -> Spec:
    k = r.randint(2, 4)
    return Spec(
        f"every_{k}th",
        "lst",
        f"returns a list with every {k}th element of lst, starting with the first "
        f"element (indices 0, {k}, {2 * k}, ...)",
        f"return lst[::{k}]",
        [(_ints(r, r.randint(5, 10), 0, 9),) for _ in range(3)],
    )


_HARD_FIXED: tuple[SpecFamily, ...] = (
    Family(
        "count_vowels",
        "s",
        "returns the number of vowels (a, e, i, o, u) in the lowercase string s",
        "return sum(1 for c in s if c in 'aeiou')",
        _sentence_args,
    ),
    Family(
        "is_palindrome",
        "s",
        "returns True if the string s reads the same forwards and backwards, otherwise False",
        "return s == s[::-1]",
        lambda r: [("level",), (r.choice(WORDS),), ("abba",), ("ab",)],
    ),
    Family(
        "factorial",
        "n",
        "returns n! (the product 1 * 2 * ... * n, with factorial(0) = 1)",
        "result = 1\nfor i in range(2, n + 1):\n    result *= i\nreturn result",
        lambda r: [(0,), (r.randint(3, 6),), (r.randint(7, 10),)],
    ),
    Family(
        "fibonacci",
        "n",
        "returns the n-th Fibonacci number, where fibonacci(0) = 0 and fibonacci(1) = 1",
        "a, b = 0, 1\nfor _ in range(n):\n    a, b = b, a + b\nreturn a",
        lambda r: [(0,), (1,), (r.randint(5, 20),)],
    ),
    Family(
        "is_prime",
        "n",
        "returns True if n is a prime number, otherwise False",
        "if n < 2:\n    return False\ni = 2\nwhile i * i <= n:\n    if n % i == 0:\n        return False\n"
        "    i += 1\nreturn True",
        lambda r: [(1,), (r.choice((13, 29, 97)),), (r.choice((21, 49, 91)),), (2,)],
    ),
    Family(
        "digit_sum",
        "n",
        "returns the sum of the decimal digits of the non-negative integer n",
        "return sum(int(d) for d in str(n))",
        lambda r: [(r.randint(100, 99999),), (0,), (r.randint(10, 99),)],
    ),
    Family(
        "remove_duplicates",
        "lst",
        "returns a list of the elements of lst without duplicates, keeping the first occurrence of each in order",
        "out = []\nfor x in lst:\n    if x not in out:\n        out.append(x)\nreturn out",
        lambda r: [(_ints(r, 8, 0, 5),) for _ in range(3)],
    ),
    Family(
        "second_largest",
        "lst",
        "returns the second largest distinct value in lst (assume at least two distinct values)",
        "return sorted(set(lst))[-2]",
        lambda r: [(_ints(r, 6, 0, 50) + [51, 52],), ([3, 3, 1],), ([5, 9, 9, 2],)],
    ),
    Family(
        "capitalize_words",
        "s",
        "returns s with the first letter of every word in upper case (words are separated by single spaces)",
        "return ' '.join(w[:1].upper() + w[1:] for w in s.split(' '))",
        _sentence_args,
    ),
    Family(
        "running_sum",
        "lst",
        "returns the list of running totals of lst (the i-th element is the sum of lst[0..i])",
        "out, total = [], 0\nfor x in lst:\n    total += x\n    out.append(total)\nreturn out",
        _list_args(),
    ),
    Family(
        "max_minus_min",
        "lst",
        "returns the difference between the largest and the smallest number in lst",
        "return max(lst) - min(lst)",
        _list_args(),
    ),
    Family(
        "flatten",
        "lists",
        "returns one list with the elements of all the lists in `lists`, in order",
        "return [x for sub in lists for x in sub]",
        lambda r: [([_ints(r, 2, 0, 9), _ints(r, 3, 0, 9)],), ([[1], [], [2, 3]],), ([],)],
    ),
    Family(
        "word_lengths",
        "s",
        "returns the list of the lengths of the words of the sentence s (words are separated by spaces)",
        "return [len(w) for w in s.split()]",
        _sentence_args,
    ),
    Family(
        "most_common",
        "lst",
        "returns the value that appears most often in lst; if several values tie, returns the smallest of them",
        "return min(set(lst), key=lambda x: (-lst.count(x), x))",
        lambda r: [(_ints(r, 7, 0, 4),) for _ in range(2)] + [([2, 1, 2, 1],)],
    ),
    Family(
        "gcd",
        "a, b",
        "returns the greatest common divisor of the positive integers a and b",
        "while b:\n    a, b = b, a % b\nreturn a",
        lambda r: [(12, 18), (r.randint(2, 50) * 3, 9), (17, 5)],
    ),
    Family(
        "alternate_case",
        "s",
        "returns s with characters at even indices in upper case and characters at odd indices in lower case",
        "return ''.join(c.upper() if i % 2 == 0 else c.lower() for i, c in enumerate(s))",
        _word_args,
    ),
)

_HARD_FAMILIES: tuple[SpecFamily, ...] = (
    Family(
        "sum_multiples_of_{k}",
        "lst",
        "returns the sum of the numbers in lst that are divisible by {k}",
        "return sum(x for x in lst if x % {k} == 0)",
        _list_args(0, 60),
        k=range(2, 10),
    ),
    Family(
        "keep_greater_than_{k}",
        "lst",
        "returns the numbers in lst that are greater than {k}, sorted from largest to smallest",
        "return sorted((x for x in lst if x > {k}), reverse=True)",
        _list_args(-5, 40),
        k=range(0, 21),
    ),
    _replace_reversed,
    Family(
        "rotate_left_{k}",
        "lst",
        "returns the list lst rotated to the left by {k} positions (elements that "
        "fall off the front go to the end); assume len(lst) > {k}",
        "return lst[{k}:] + lst[:{k}]",
        lambda r, k: [(_ints(r, r.randint(k + 1, 8), 0, 9),) for _ in range(3)],
        k=range(1, 6),
    ),
    Family(
        "chunks_of_{k}",
        "lst",
        "splits the list lst into consecutive chunks of {k} elements (the last chunk "
        "may be shorter) and returns the list of chunks",
        "return [lst[i:i + {k}] for i in range(0, len(lst), {k})]",
        lambda r, k: [(_ints(r, r.randint(3, 9), 0, 9),) for _ in range(3)],
        k=range(2, 6),
    ),
    _fizzbuzz,
    Family(
        "shift_letters_{k}",
        "s",
        "shifts every lowercase letter of s forward by {k} places in the alphabet, "
        "wrapping around from 'z' to 'a', leaves other characters unchanged, and "
        "returns the result",
        "return ''.join(chr((ord(c) - 97 + {k}) % 26 + 97) if 'a' <= c <= 'z' else c for c in s)",
        lambda r, k: [(r.choice(SENTENCES),) for _ in range(2)] + [("xyz!",)],
        k=range(1, 26),
    ),
    Family(
        "count_words_longer_than_{k}",
        "s",
        "returns how many words in the sentence s (words are separated by spaces) have more than {k} letters",
        "return sum(1 for w in s.split() if len(w) > {k})",
        _sentence_args,
        k=range(2, 7),
    ),
    Family(
        "count_{k}s",
        "lst",
        "returns how many times the number {k} appears in the list lst",
        "return lst.count({k})",
        lambda r, k: [(_ints(r, 6, 0, 9) + [k],) for _ in range(2)] + [([k, k, 1, k],)],
        k=range(0, 10),
    ),
    _every_kth,
    Family(
        "pad_left_{k}",
        "s",
        "returns s padded on the left with '{c}' characters to a total length of "
        "{k} (strings of length {k} or more are returned unchanged)",
        "return s.rjust({k}, '{c}')",
        lambda r, k, c: [("ab",), (r.choice(WORDS),), ("x" * (k + 1),)],
        k=range(5, 13),
        c="*#.-0",
    ),
    Family(
        "sum_of_powers_{k}",
        "lst",
        "returns the sum of each number in lst raised to the power {k}",
        "return sum(x ** {k} for x in lst)",
        _list_args(-5, 9),
        k=range(2, 4),
    ),
    Family(
        "largest_{k}",
        "lst",
        "returns the {k} largest numbers of lst in descending order; assume len(lst) >= {k}",
        "return sorted(lst, reverse=True)[:{k}]",
        lambda r, k: [(_ints(r, r.randint(k + 1, 8), -9, 30),) for _ in range(3)],
        k=range(1, 5),
    ),
    pick_family(_HARD_FIXED),
)


# ---- assembling examples ------------------------------------------------------------------------


def _call(func: str, args: tuple) -> str:
    return f"{func}({', '.join(repr(a) for a in args)})"


def spec_to_example(spec: Spec, *, hard: bool) -> Example:
    namespace: dict[str, Any] = {}
    exec(compile(spec.solution, f"<reference {spec.func}>", "exec"), namespace)  # trusted source
    fn = namespace[spec.func]
    asserts = []
    for args in spec.inputs:
        expected = fn(*[list(a) if isinstance(a, list) else a for a in args])
        asserts.append(f"assert {_call(spec.func, args)} == {expected!r}")
    tests = "\n".join(dict.fromkeys(asserts))  # drop repeated asserts, keep order
    if hard:
        prompt = f"Write a Python function `{spec.func}({spec.params})` that {spec.desc}.\nFor example:\n{asserts[0]}"
    else:
        prompt = (
            f"Write a Python function `{spec.func}({spec.params})` that {spec.desc}.\n"
            f"Your code should pass this test:\n{asserts[0]}"
        )
    return Example(
        id="",
        prompt=prompt,
        answer=spec.solution,
        tests=tests,
        entry_point=spec.func,
        category="code",
    )


def _code_task(
    name: str, specs: SpecFamily, sizes: dict[str, int], seed: int, description: str, *, hard: bool, **options: Any
) -> GradedTask:
    """Python functions graded by running their tests. A reference solution is asked at most once: the same
    function with other test inputs counts as a repeat."""

    def draw(r: random.Random) -> Example:
        return spec_to_example(specs(r), hard=hard)

    return generated_task(
        name, "code", "python-tests", draw, sizes, seed, key=lambda ex: ex.answer, description=description, **options
    )


def make_code_task(seed: int = 0) -> GradedTask:
    description = "one-line Python functions, graded by running tests"
    return _code_task("code", _easy_specs, TRAIN_SIZES, seed, description, hard=False, max_new_tokens=64)


def make_code_hard_task(seed: int = 0) -> GradedTask:
    description = "small-algorithm Python functions, graded by running tests"
    return _code_task(
        "code-hard", pick_family(_HARD_FAMILIES), UNSEEN_SIZES, seed, description, hard=True, max_new_tokens=192
    )
