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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .base import Example, build_splits
from .common import GradedTask

TRAIN_SIZES = {"train": 256, "valid": 64, "test": 128}
UNSEEN_SIZES = {"train": 32, "valid": 16, "test": 128}

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

    key: str  # identity of the task (family + parameters), for de-duplication
    func: str  # function name
    params: str  # parameter list, e.g. "x" or "a, b"
    desc: str  # "returns ..." sentence fragment
    solution: str  # reference implementation (source)
    inputs: list[tuple[Any, ...]]  # argument tuples for the tests (first one shown in the prompt)


def _ints(r: random.Random, n: int, lo: int = -20, hi: int = 50) -> list[int]:
    return [r.randint(lo, hi) for _ in range(n)]


def _lists(r: random.Random, k: int = 3, lo: int = -10, hi: int = 30) -> list[tuple]:
    return [(_ints(r, r.randint(3, 7), lo, hi),) for _ in range(k)]


def _words(r: random.Random, k: int = 3) -> list[tuple]:
    return [(w,) for w in r.sample(WORDS, k)]


# ---- code (training): one-liners ----------------------------------------------------------------

# Measured on SmolLM2-135M-Instruct (greedy): the base model almost always solves the
# one-liner families except those in _UNSOLVED, which it almost never gets (argument order: "'w' followed by s", "k minus
# x"; membership; letter counting). The mix is set so base accuracy is about 40 %.
_UNSOLVED = {4, 8, 10, 15}  # count_c, add_prefix_w, contains_k, subtract_from_k
_EASY_WEIGHTS = [0.58 / len(_UNSOLVED) if i in _UNSOLVED else 0.42 / (18 - len(_UNSOLVED)) for i in range(18)]


def _easy_specs(r: random.Random) -> Spec:
    # Trivial families (the base model nearly always gets them) are kept to about a third of the
    # mix, so that base accuracy sits well inside 10-60 % (see the calibration notes in SPEC).
    fam = r.choices(range(18), weights=_EASY_WEIGHTS)[0]
    if fam == 0:
        k = r.randint(2, 99)
        return Spec(
            f"add{k}",
            f"add_{k}",
            "x",
            f"returns x plus {k}",
            f"def add_{k}(x):\n    return x + {k}",
            [(v,) for v in _ints(r, 3)],
        )
    if fam == 1:
        k = r.randint(2, 20)
        return Spec(
            f"mul{k}",
            f"multiply_by_{k}",
            "x",
            f"returns x multiplied by {k}",
            f"def multiply_by_{k}(x):\n    return x * {k}",
            [(v,) for v in _ints(r, 3)],
        )
    if fam == 2:
        k = r.randint(2, 99)
        return Spec(
            f"sub{k}",
            f"subtract_{k}",
            "x",
            f"returns x minus {k}",
            f"def subtract_{k}(x):\n    return x - {k}",
            [(v,) for v in _ints(r, 3)],
        )
    if fam == 3:
        k = r.randint(0, 99)
        xs = [k + 5, k - 3, k]
        return Spec(
            f"gt{k}",
            f"is_greater_than_{k}",
            "x",
            f"returns True if x is greater than {k}, otherwise False",
            f"def is_greater_than_{k}(x):\n    return x > {k}",
            [(v,) for v in xs],
        )
    if fam == 4:
        c = r.choice(string.ascii_lowercase)
        ins = [(f"{c}x{c}",), (r.choice(WORDS) + c,), (r.choice(WORDS),)]
        return Spec(
            f"count{c}",
            f"count_{c}",
            "s",
            f"returns how many times the letter '{c}' appears in the string s",
            f"def count_{c}(s):\n    return s.count('{c}')",
            ins,
        )
    if fam == 5:
        k = r.randint(2, 9)
        return Spec(
            f"rep{k}",
            f"repeat_{k}_times",
            "s",
            f"returns the string s repeated {k} times",
            f"def repeat_{k}_times(s):\n    return s * {k}",
            _words(r),
        )
    if fam == 6:
        k = r.randint(2, 20)
        xs = [k * r.randint(1, 9), k * r.randint(1, 9) + 1, r.randint(1, 100)]
        return Spec(
            f"div{k}",
            f"is_divisible_by_{k}",
            "n",
            f"returns True if n is divisible by {k}, otherwise False",
            f"def is_divisible_by_{k}(n):\n    return n % {k} == 0",
            [(v,) for v in xs],
        )
    if fam == 7:
        k = r.randint(2, 20)
        return Spec(
            f"mod{k}",
            f"remainder_by_{k}",
            "n",
            f"returns the remainder of n divided by {k}",
            f"def remainder_by_{k}(n):\n    return n % {k}",
            [(v,) for v in _ints(r, 3, 0, 100)],
        )
    if fam == 8:
        w = r.choice(WORDS)
        return Spec(
            f"prefix{w}",
            f"add_prefix_{w}",
            "s",
            f"returns the string '{w}' followed by the string s",
            f"def add_prefix_{w}(s):\n    return '{w}' + s",
            _words(r),
        )
    if fam == 9:
        c = r.choice(string.ascii_lowercase)
        ins = [(c + r.choice(WORDS),), (r.choice(WORDS),), ("x" + c,)]
        return Spec(
            f"starts{c}",
            f"starts_with_{c}",
            "s",
            f"returns True if the string s starts with the letter '{c}', otherwise False",
            f"def starts_with_{c}(s):\n    return s.startswith('{c}')",
            ins,
        )
    if fam == 10:
        k = r.randint(0, 199)
        ins = [(_ints(r, 4, 0, 20) + [k],), (_ints(r, 4, 21, 40),), ([k, 1, 2],)]
        return Spec(
            f"contains{k}",
            f"contains_{k}",
            "lst",
            f"returns True if the number {k} is in the list lst, otherwise False",
            f"def contains_{k}(lst):\n    return {k} in lst",
            ins,
        )
    if fam == 11:
        k = r.randint(2, 50)
        return Spec(
            f"addlen{k}",
            f"length_plus_{k}",
            "s",
            f"returns the length of the string s plus {k}",
            f"def length_plus_{k}(s):\n    return len(s) + {k}",
            _words(r),
        )
    if fam == 12:
        k = r.randint(2, 30)
        return Spec(
            f"sumplus{k}",
            f"sum_plus_{k}",
            "a, b",
            f"returns the sum of a and b plus {k}",
            f"def sum_plus_{k}(a, b):\n    return a + b + {k}",
            [tuple(_ints(r, 2)) for _ in range(3)],
        )
    if fam == 13:
        c = r.choice(string.ascii_lowercase)
        ins = [(r.choice(WORDS) + c,), (c + "xy",), (r.choice(WORDS),)]
        return Spec(
            f"ends{c}",
            f"ends_with_{c}",
            "s",
            f"returns True if the string s ends with the letter '{c}', otherwise False",
            f"def ends_with_{c}(s):\n    return s.endswith('{c}')",
            ins,
        )
    if fam == 14:
        k = r.randint(0, 50)
        return Spec(
            f"eq{k}",
            f"is_equal_to_{k}",
            "x",
            f"returns True if x is equal to {k}, otherwise False",
            f"def is_equal_to_{k}(x):\n    return x == {k}",
            [(k,), (k + 1,), (k - 7,)],
        )
    if fam == 15:
        k = r.randint(2, 199)
        return Spec(
            f"from{k}",
            f"subtract_from_{k}",
            "x",
            f"returns {k} minus x",
            f"def subtract_from_{k}(x):\n    return {k} - x",
            [(v,) for v in _ints(r, 3)],
        )
    if fam == 16:
        w = r.choice(WORDS)
        return Spec(
            f"suffix{w}",
            f"add_suffix_{w}",
            "s",
            f"returns the string s followed by the string '{w}'",
            f"def add_suffix_{w}(s):\n    return s + '{w}'",
            _words(r),
        )
    fixed: list[tuple[str, str, str, str, Callable[[random.Random], list[tuple]]]] = [
        (
            "sum_list",
            "lst",
            "returns the sum of the numbers in the list lst",
            "def sum_list(lst):\n    return sum(lst)",
            _lists,
        ),
        (
            "max_of_list",
            "lst",
            "returns the largest number in the list lst",
            "def max_of_list(lst):\n    return max(lst)",
            _lists,
        ),
        (
            "min_of_list",
            "lst",
            "returns the smallest number in the list lst",
            "def min_of_list(lst):\n    return min(lst)",
            _lists,
        ),
        (
            "first_element",
            "lst",
            "returns the first element of the list lst",
            "def first_element(lst):\n    return lst[0]",
            _lists,
        ),
        (
            "last_element",
            "lst",
            "returns the last element of the list lst",
            "def last_element(lst):\n    return lst[-1]",
            _lists,
        ),
        (
            "list_length",
            "lst",
            "returns the number of elements in the list lst",
            "def list_length(lst):\n    return len(lst)",
            _lists,
        ),
        ("reverse_string", "s", "returns the string s reversed", "def reverse_string(s):\n    return s[::-1]", _words),
        ("to_upper", "s", "returns the string s in upper case", "def to_upper(s):\n    return s.upper()", _words),
        (
            "string_length",
            "s",
            "returns the length of the string s",
            "def string_length(s):\n    return len(s)",
            _words,
        ),
        (
            "is_even",
            "n",
            "returns True if n is even, otherwise False",
            "def is_even(n):\n    return n % 2 == 0",
            lambda r: [(v,) for v in _ints(r, 3)],
        ),
        (
            "square",
            "x",
            "returns the square of x",
            "def square(x):\n    return x * x",
            lambda r: [(v,) for v in _ints(r, 3)],
        ),
        (
            "absolute_value",
            "x",
            "returns the absolute value of x",
            "def absolute_value(x):\n    return abs(x)",
            lambda r: [(-r.randint(1, 40),), (5,), (0,)],
        ),
        (
            "max_of_two",
            "a, b",
            "returns the larger of the two numbers a and b",
            "def max_of_two(a, b):\n    return max(a, b)",
            lambda r: [tuple(_ints(r, 2)) for _ in range(3)],
        ),
        (
            "first_char",
            "s",
            "returns the first character of the string s",
            "def first_char(s):\n    return s[0]",
            _words,
        ),
        (
            "double_list",
            "lst",
            "returns a new list with every number in lst multiplied by 2",
            "def double_list(lst):\n    return [x * 2 for x in lst]",
            _lists,
        ),
        (
            "join_words",
            "a, b",
            "returns the strings a and b joined with a space between them",
            "def join_words(a, b):\n    return a + ' ' + b",
            lambda r: [tuple(r.sample(WORDS, 2)) for _ in range(3)],
        ),
    ]
    name, params, desc, sol, gen = fixed[r.randrange(len(fixed))]
    return Spec(name, name, params, desc, sol, gen(r))


# ---- code-hard (unseen): small algorithms --------------------------------------------------------


def _hard_specs(r: random.Random) -> Spec:
    fam = r.randrange(14)
    if fam == 0:
        k = r.randint(2, 9)
        return Spec(
            f"summult{k}",
            f"sum_multiples_of_{k}",
            "lst",
            f"returns the sum of the numbers in lst that are divisible by {k}",
            f"def sum_multiples_of_{k}(lst):\n    return sum(x for x in lst if x % {k} == 0)",
            _lists(r, 3, 0, 60),
        )
    if fam == 1:
        k = r.randint(0, 20)
        return Spec(
            f"filter{k}",
            f"keep_greater_than_{k}",
            "lst",
            f"returns the numbers in lst that are greater than {k}, sorted from largest to smallest",
            f"def keep_greater_than_{k}(lst):\n    return sorted((x for x in lst if x > {k}), reverse=True)",
            _lists(r, 3, -5, 40),
        )
    if fam == 2:
        a, b = r.sample(string.ascii_lowercase, 2)
        ins = [(w,) for w in r.sample(WORDS, 2)] + [(f"{a}{b}{a}x",)]
        return Spec(
            f"replace{a}{b}",
            f"replace_{a}_with_{b}_reversed",
            "s",
            f"replaces every letter '{a}' in the string s by '{b}' and returns the result reversed",
            f"def replace_{a}_with_{b}_reversed(s):\n    return s.replace('{a}', '{b}')[::-1]",
            ins,
        )
    if fam == 3:
        k = r.randint(1, 5)
        return Spec(
            f"rotate{k}",
            f"rotate_left_{k}",
            "lst",
            f"returns the list lst rotated to the left by {k} positions (elements that "
            f"fall off the front go to the end); assume len(lst) > {k}",
            f"def rotate_left_{k}(lst):\n    return lst[{k}:] + lst[:{k}]",
            [(_ints(r, r.randint(k + 1, 8), 0, 9),) for _ in range(3)],
        )
    if fam == 4:
        k = r.randint(2, 5)
        return Spec(
            f"chunk{k}",
            f"chunks_of_{k}",
            "lst",
            f"splits the list lst into consecutive chunks of {k} elements (the last chunk "
            f"may be shorter) and returns the list of chunks",
            f"def chunks_of_{k}(lst):\n    return [lst[i:i + {k}] for i in range(0, len(lst), {k})]",
            [(_ints(r, r.randint(3, 9), 0, 9),) for _ in range(3)],
        )
    if fam == 5:
        a, b = r.choice([(x, y) for x in range(2, 8) for y in range(2, 8) if x % y and y % x])
        only_a = [a * i for i in range(1, 12) if (a * i) % b]
        only_b = [b * i for i in range(1, 12) if (b * i) % a]
        neither = [n for n in range(1, 60) if n % a and n % b]
        ins = [(a * b * r.randint(1, 3),), (r.choice(only_a),), (r.choice(only_b),), (r.choice(neither),)]
        return Spec(
            f"fizz{a}{b}",
            f"fizzbuzz_{a}_{b}",
            "n",
            f"returns 'FizzBuzz' if n is divisible by both {a} and {b}, 'Fizz' if it is "
            f"divisible only by {a}, 'Buzz' if it is divisible only by {b}, and otherwise "
            f"the number as a string",
            f"def fizzbuzz_{a}_{b}(n):\n    if n % {a} == 0 and n % {b} == 0:\n"
            f"        return 'FizzBuzz'\n    if n % {a} == 0:\n        return 'Fizz'\n"
            f"    if n % {b} == 0:\n        return 'Buzz'\n    return str(n)",
            ins,
        )
    if fam == 6:
        k = r.randint(1, 25)
        return Spec(
            f"caesar{k}",
            f"shift_letters_{k}",
            "s",
            f"shifts every lowercase letter of s forward by {k} places in the alphabet, "
            f"wrapping around from 'z' to 'a', leaves other characters unchanged, and "
            f"returns the result",
            f"def shift_letters_{k}(s):\n    return ''.join(chr((ord(c) - 97 + {k}) % 26 "
            f"+ 97) if 'a' <= c <= 'z' else c for c in s)",
            [(r.choice(SENTENCES),) for _ in range(2)] + [("xyz!",)],
        )
    if fam == 7:
        k = r.randint(2, 6)
        return Spec(
            f"longwords{k}",
            f"count_words_longer_than_{k}",
            "s",
            f"returns how many words in the sentence s (words are separated by spaces) have more than {k} letters",
            f"def count_words_longer_than_{k}(s):\n    return sum(1 for w in s.split() if len(w) > {k})",
            [(x,) for x in r.sample(SENTENCES, 3)],
        )
    if fam == 8:
        k = r.randint(0, 9)
        ins = [(_ints(r, 6, 0, 9) + [k],) for _ in range(2)] + [([k, k, 1, k],)]
        return Spec(
            f"countk{k}",
            f"count_{k}s",
            "lst",
            f"returns how many times the number {k} appears in the list lst",
            f"def count_{k}s(lst):\n    return lst.count({k})",
            ins,
        )
    if fam == 9:
        k = r.randint(2, 4)
        return Spec(
            f"every{k}",
            f"every_{k}th",
            "lst",
            f"returns a list with every {k}th element of lst, starting with the first "
            f"element (indices 0, {k}, {2 * k}, ...)",
            f"def every_{k}th(lst):\n    return lst[::{k}]",
            [(_ints(r, r.randint(5, 10), 0, 9),) for _ in range(3)],
        )
    if fam == 10:
        k = r.randint(5, 12)
        c = r.choice("*#.-0")
        return Spec(
            f"pad{k}{c}",
            f"pad_left_{k}",
            "s",
            f"returns s padded on the left with '{c}' characters to a total length of "
            f"{k} (strings of length {k} or more are returned unchanged)",
            f"def pad_left_{k}(s):\n    return s.rjust({k}, '{c}')",
            [("ab",), (r.choice(WORDS),), ("x" * (k + 1),)],
        )
    if fam == 11:
        k = r.randint(2, 3)
        return Spec(
            f"powsum{k}",
            f"sum_of_powers_{k}",
            "lst",
            f"returns the sum of each number in lst raised to the power {k}",
            f"def sum_of_powers_{k}(lst):\n    return sum(x ** {k} for x in lst)",
            _lists(r, 3, -5, 9),
        )
    if fam == 12:
        k = r.randint(1, 4)
        return Spec(
            f"topk{k}",
            f"largest_{k}",
            "lst",
            f"returns the {k} largest numbers of lst in descending order; assume len(lst) >= {k}",
            f"def largest_{k}(lst):\n    return sorted(lst, reverse=True)[:{k}]",
            [(_ints(r, r.randint(k + 1, 8), -9, 30),) for _ in range(3)],
        )
    fixed: list[tuple[str, str, str, str, Callable[[random.Random], list[tuple]]]] = [
        (
            "count_vowels",
            "s",
            "returns the number of vowels (a, e, i, o, u) in the lowercase string s",
            "def count_vowels(s):\n    return sum(1 for c in s if c in 'aeiou')",
            lambda r: [(x,) for x in r.sample(SENTENCES, 3)],
        ),
        (
            "is_palindrome",
            "s",
            "returns True if the string s reads the same forwards and backwards, otherwise False",
            "def is_palindrome(s):\n    return s == s[::-1]",
            lambda r: [("level",), (r.choice(WORDS),), ("abba",), ("ab",)],
        ),
        (
            "factorial",
            "n",
            "returns n! (the product 1 * 2 * ... * n, with factorial(0) = 1)",
            "def factorial(n):\n    result = 1\n    for i in range(2, n + 1):\n        result *= i\n    return result",
            lambda r: [(0,), (r.randint(3, 6),), (r.randint(7, 10),)],
        ),
        (
            "fibonacci",
            "n",
            "returns the n-th Fibonacci number, where fibonacci(0) = 0 and fibonacci(1) = 1",
            "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a",
            lambda r: [(0,), (1,), (r.randint(5, 20),)],
        ),
        (
            "is_prime",
            "n",
            "returns True if n is a prime number, otherwise False",
            "def is_prime(n):\n    if n < 2:\n        return False\n    i = 2\n    while i * i <= n:\n"
            "        if n % i == 0:\n            return False\n        i += 1\n    return True",
            lambda r: [(1,), (r.choice((13, 29, 97)),), (r.choice((21, 49, 91)),), (2,)],
        ),
        (
            "digit_sum",
            "n",
            "returns the sum of the decimal digits of the non-negative integer n",
            "def digit_sum(n):\n    return sum(int(d) for d in str(n))",
            lambda r: [(r.randint(100, 99999),), (0,), (r.randint(10, 99),)],
        ),
        (
            "remove_duplicates",
            "lst",
            "returns a list of the elements of lst without duplicates, keeping the first occurrence of each in order",
            "def remove_duplicates(lst):\n    out = []\n    for x in lst:\n        if x not in out:\n"
            "            out.append(x)\n    return out",
            lambda r: [(_ints(r, 8, 0, 5),) for _ in range(3)],
        ),
        (
            "second_largest",
            "lst",
            "returns the second largest distinct value in lst (assume at least two distinct values)",
            "def second_largest(lst):\n    return sorted(set(lst))[-2]",
            lambda r: [(_ints(r, 6, 0, 50) + [51, 52],), ([3, 3, 1],), ([5, 9, 9, 2],)],
        ),
        (
            "capitalize_words",
            "s",
            "returns s with the first letter of every word in upper case (words are separated by single spaces)",
            "def capitalize_words(s):\n    return ' '.join(w[:1].upper() + w[1:] for w in s.split(' '))",
            lambda r: [(x,) for x in r.sample(SENTENCES, 3)],
        ),
        (
            "running_sum",
            "lst",
            "returns the list of running totals of lst (the i-th element is the sum of lst[0..i])",
            "def running_sum(lst):\n    out, total = [], 0\n    for x in lst:\n        total += x\n"
            "        out.append(total)\n    return out",
            _lists,
        ),
        (
            "max_minus_min",
            "lst",
            "returns the difference between the largest and the smallest number in lst",
            "def max_minus_min(lst):\n    return max(lst) - min(lst)",
            _lists,
        ),
        (
            "flatten",
            "lists",
            "returns one list with the elements of all the lists in `lists`, in order",
            "def flatten(lists):\n    return [x for sub in lists for x in sub]",
            lambda r: [([_ints(r, 2, 0, 9), _ints(r, 3, 0, 9)],), ([[1], [], [2, 3]],), ([],)],
        ),
        (
            "word_lengths",
            "s",
            "returns the list of the lengths of the words of the sentence s (words are separated by spaces)",
            "def word_lengths(s):\n    return [len(w) for w in s.split()]",
            lambda r: [(x,) for x in r.sample(SENTENCES, 3)],
        ),
        (
            "most_common",
            "lst",
            "returns the value that appears most often in lst; if several values tie, returns the smallest of them",
            "def most_common(lst):\n    return min(set(lst), key=lambda x: (-lst.count(x), x))",
            lambda r: [(_ints(r, 7, 0, 4),) for _ in range(2)] + [([2, 1, 2, 1],)],
        ),
        (
            "gcd",
            "a, b",
            "returns the greatest common divisor of the positive integers a and b",
            "def gcd(a, b):\n    while b:\n        a, b = b, a % b\n    return a",
            lambda r: [(12, 18), (r.randint(2, 50) * 3, 9), (17, 5)],
        ),
        (
            "alternate_case",
            "s",
            "returns s with characters at even indices in upper case and characters at odd indices in lower case",
            "def alternate_case(s):\n    return ''.join(c.upper() if i % 2 == 0 else c.lower() "
            "for i, c in enumerate(s))",
            _words,
        ),
    ]
    name, params, desc, sol, gen = fixed[r.randrange(len(fixed))]
    return Spec(name, name, params, desc, sol, gen(r))


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


def _build(name: str, specs, sizes: dict[str, int], seed: int, hard: bool):
    keys: dict[str, str] = {}

    def make(r: random.Random) -> Example:
        spec = specs(r)
        ex = spec_to_example(spec, hard=hard)
        keys[ex.prompt] = spec.key
        return ex

    return build_splits(name, make, sizes, seed, key=lambda ex: keys[ex.prompt])


def make_code_task(seed: int = 0) -> GradedTask:
    return GradedTask(
        "code",
        "code",
        "python-tests",
        lambda: _build("code", _easy_specs, TRAIN_SIZES, seed, hard=False),
        max_new_tokens=64,
        description="one-line Python functions, graded by running tests",
    )


def make_code_hard_task(seed: int = 0) -> GradedTask:
    return GradedTask(
        "code-hard",
        "code",
        "python-tests",
        lambda: _build("code-hard", _hard_specs, UNSEEN_SIZES, seed, hard=True),
        max_new_tokens=192,
        description="small-algorithm Python functions, graded by running tests",
    )
