"""Procedurally generated arithmetic tasks (offline, seeded).

* ``math`` (a GSM8K stand-in for training an expert): one-step additions/subtractions, bare or
  as one-sentence word problems; "Reply with just the number."; graded on the final number
  (SmolLM2-135M-Instruct often writes "a + b = c" or a sentence: grading the last number
  grades the answer, not the wrapping).
* ``math-hard`` (a MATH stand-in, unseen): two-step arithmetic, linear equations, remainders,
  percentages, LCM, area/perimeter, multi-step word problems; "\\boxed{}" answers, graded on the
  boxed value or else the last number.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from typing import Any

from .base import Example
from .common import TRAIN_SIZES, UNSEEN_SIZES, GradedTask, generated_task, pick_family

# One kind of problem: draws an example with the RNG it is given.
Family = Callable[[random.Random], Example]

NAMES = (
    "Tom",
    "Anna",
    "Sam",
    "Lily",
    "Ben",
    "Mia",
    "Leo",
    "Emma",
    "Max",
    "Zoe",
    "Jack",
    "Ella",
    "Noah",
    "Ava",
    "Liam",
    "Sara",
    "Omar",
    "Nina",
    "Ravi",
    "Hana",
    "Carlos",
    "Maya",
    "Ivan",
    "Lucy",
)
ITEMS = (
    "apples",
    "books",
    "pencils",
    "stickers",
    "marbles",
    "cookies",
    "cards",
    "shells",
    "coins",
    "flowers",
    "stamps",
    "balloons",
    "candies",
    "toy cars",
    "eggs",
    "oranges",
)

MATH_SUFFIX = "Reply with just the number."
HARD_SUFFIX = "Put the final answer in \\boxed{}."


def _ex(prompt: str, answer: int | float, category: str = "math") -> Example:
    ans = str(int(answer)) if float(answer).is_integer() else repr(float(answer))
    return Example(id="", prompt=prompt, answer=ans, category=category)


# ---- math (training) --------------------------------------------------------------------------


def _add(r: random.Random) -> Example:
    a, b = r.randint(10, 49), r.randint(1, 9)
    return _ex(f"What is {a} + {b}? {MATH_SUFFIX}", a + b)


def _sub(r: random.Random) -> Example:
    a, b = r.randint(10, 30), r.randint(1, 9)
    return _ex(f"What is {a} - {b}? {MATH_SUFFIX}", a - b)


def _add_easy(r: random.Random) -> Example:
    if r.random() < 0.5:
        a, b = r.randint(1, 9), r.randint(1, 9)
    else:
        a, b = 10 * r.randint(1, 9), 10 * r.randint(1, 9)
    return _ex(f"What is {a} + {b}? {MATH_SUFFIX}", a + b)


def _word_add(r: random.Random) -> Example:
    name, item = r.choice(NAMES), r.choice(ITEMS)
    a, b = r.randint(2, 15), r.randint(1, 9)
    return _ex(
        f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now? {MATH_SUFFIX}",
        a + b,
    )


def _word_sub(r: random.Random) -> Example:
    name, item = r.choice(NAMES), r.choice(ITEMS)
    a, b = r.randint(10, 20), r.randint(1, 9)
    return _ex(
        f"{name} has {a} {item} and gives {b} of them away. How many {item} does {name} have left? {MATH_SUFFIX}",
        a - b,
    )


# Greedy SmolLM2-135M-Instruct accuracy per family (20-item probes): _add ~25 %, _sub ~35 %,
# _add_easy ~70 %, _word_add ~50-75 %, _word_sub ~15 %.
MATH_FAMILIES: tuple[Family, ...] = (
    _add,
    _sub,
    _add_easy,
    _word_add,
    _word_sub,
)


# ---- math-hard (unseen) -------------------------------------------------------------------------


def _mul_add(r: random.Random) -> Example:
    a, b, c = r.randint(11, 29), r.randint(3, 9), r.randint(10, 99)
    return _ex(f"Compute {a} * {b} + {c}. {HARD_SUFFIX}", a * b + c)


def _paren(r: random.Random) -> Example:
    a, b, c = r.randint(5, 40), r.randint(5, 40), r.randint(2, 9)
    return _ex(f"Compute ({a} + {b}) * {c}. {HARD_SUFFIX}", (a + b) * c)


def _linear(r: random.Random) -> Example:
    a, x, b = r.randint(2, 9), r.randint(-12, 15), r.randint(1, 40)
    return _ex(f"Solve for x: {a}x + {b} = {a * x + b}. {HARD_SUFFIX}", x)


def _remainder(r: random.Random) -> Example:
    b = r.randint(3, 12)
    a = r.randint(30, 300)
    if a % b == 0:
        a += 1
    return _ex(f"What is the remainder when {a} is divided by {b}? {HARD_SUFFIX}", a % b)


def _percent(r: random.Random) -> Example:
    p = r.choice((10, 20, 25, 30, 40, 50, 60, 75))
    n = r.randint(2, 40) * 20
    return _ex(f"What is {p}% of {n}? {HARD_SUFFIX}", p * n // 100)


def _lcm(r: random.Random) -> Example:
    a, b = r.randint(2, 15), r.randint(2, 15)
    if a == b:
        b += 1
    return _ex(f"What is the least common multiple of {a} and {b}? {HARD_SUFFIX}", a * b // math.gcd(a, b))


def _rectangle(r: random.Random) -> Example:
    length, width = r.randint(3, 25), r.randint(2, 15)
    if r.random() < 0.5:
        return _ex(
            f"A rectangle is {length} cm long and {width} cm wide. What is its perimeter in cm? {HARD_SUFFIX}",
            2 * (length + width),
        )
    return _ex(
        f"A rectangle is {length} cm long and {width} cm wide. What is its area in square cm? {HARD_SUFFIX}",
        length * width,
    )


def _packs(r: random.Random) -> Example:
    name, item = r.choice(NAMES), r.choice(ITEMS)
    packs, per, away = r.randint(3, 9), r.randint(4, 12), r.randint(2, 15)
    return _ex(
        f"{name} buys {packs} packs of {item} with {per} {item} in each pack, then gives away "
        f"{away} {item}. How many {item} does {name} have left? {HARD_SUFFIX}",
        packs * per - away,
    )


def _sum_first(r: random.Random) -> Example:
    n = r.randint(5, 60)
    return _ex(f"What is the sum of the first {n} positive integers? {HARD_SUFFIX}", n * (n + 1) // 2)


def _average(r: random.Random) -> Example:
    k = r.randint(3, 5)
    while True:
        mean = r.randint(10, 60)
        vals = [mean + r.randint(-9, 9) for _ in range(k - 1)]
        last = mean * k - sum(vals)
        if last > 0:
            break
    vals.append(last)
    r.shuffle(vals)
    return _ex(f"What is the average of {', '.join(map(str, vals))}? {HARD_SUFFIX}", mean)


HARD_FAMILIES: tuple[Family, ...] = (
    _mul_add,
    _paren,
    _linear,
    _remainder,
    _percent,
    _lcm,
    _rectangle,
    _packs,
    _sum_first,
    _average,
)


def _math_task(
    name: str, families: Sequence[Family], sizes: dict[str, int], seed: int, description: str, **options: Any
) -> GradedTask:
    """Arithmetic graded on the final number (or the boxed one)."""
    return generated_task(
        name, "math", "numeric", pick_family(families), sizes, seed, description=description, **options
    )


def make_math_task(seed: int = 0) -> GradedTask:
    description = "one-step arithmetic and word problems; reply with just the number"
    return _math_task("math", MATH_FAMILIES, TRAIN_SIZES, seed, description, max_new_tokens=48)


def make_math_hard_task(seed: int = 0) -> GradedTask:
    description = "two-step arithmetic, equations, remainders, percentages (boxed answers)"
    boxed = "\\boxed{{{answer}}}"  # the reference reply in the format HARD_SUFFIX asks for
    return _math_task(
        "math-hard", HARD_FAMILIES, UNSEEN_SIZES, seed, description, max_new_tokens=128, reference_template=boxed
    )
