"""Procedurally generated multiple-choice reasoning tasks (offline, seeded).

* ``reasoning`` (an ARC-Easy stand-in for training an expert): everyday/simple-science facts,
  category membership, size/weight/temperature/speed comparisons, opposites, calendar order,
  number comparisons; four options, except three quarters of the comparisons, which oppose
  two things.
  (SmolLM2-135M-Instruct answers "A" or "B" almost regardless of content; with four options
  everywhere its greedy accuracy fell to ~17 %, the two-option comparisons lift it to the
  middle of the 10-60 % band RL needs.)
* ``reasoning-hard`` (an ARC-Challenge stand-in, unseen): transitive comparisons, "which is NOT",
  day-of-week arithmetic, sequences, two-condition number questions, cause and effect; four
  options each.

Graded leniently: the letter (``B``, ``(B)``, ``Answer: B``) or the text of the option.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any

from .base import Example, format_choices
from .common import TRAIN_SIZES, UNSEEN_SIZES, GradedTask, generated_task, pick_family

# One kind of question: draws an example with the RNG it is given.
Family = Callable[[random.Random], Example]

QUESTIONS = Path(__file__).with_name("data") / "reasoning_questions.jsonl"


def question_table(table: str) -> tuple[tuple[str, str, tuple[str, ...]], ...]:
    """(question, correct answer, distractors) rows of one table of QUESTIONS, in file order."""
    rows = (json.loads(line) for line in QUESTIONS.read_text().splitlines() if line.strip())
    return tuple((r["question"], r["answer"], tuple(r["distractors"])) for r in rows if r["table"] == table)


MC_SUFFIX = "Answer with the letter of the correct option."

CATEGORIES: dict[str, tuple[str, ...]] = {
    "fruit": (
        "apple",
        "banana",
        "grape",
        "mango",
        "pear",
        "cherry",
        "peach",
        "strawberry",
        "lemon",
        "pineapple",
        "watermelon",
        "plum",
    ),
    "vegetable": ("carrot", "potato", "onion", "broccoli", "cabbage", "spinach", "lettuce", "celery", "cauliflower"),
    "color": ("red", "blue", "green", "yellow", "purple", "pink", "brown", "black", "white"),
    "vehicle": ("car", "bus", "bicycle", "truck", "train", "boat", "airplane", "motorcycle"),
    "musical instrument": ("piano", "guitar", "violin", "drum", "flute", "trumpet", "harp", "cello"),
    "tool": ("hammer", "screwdriver", "saw", "wrench", "drill", "shovel", "pliers"),
    "part of the body": ("hand", "foot", "knee", "elbow", "nose", "ear", "shoulder", "finger"),
    "piece of furniture": ("chair", "table", "sofa", "bed", "desk", "bookshelf", "wardrobe"),
    "piece of clothing": ("shirt", "sock", "jacket", "hat", "scarf", "glove", "sweater", "dress"),
    "planet": ("Mercury", "Venus", "Earth", "Mars", "Jupiter", "Saturn", "Uranus", "Neptune"),
    "shape": ("circle", "square", "triangle", "rectangle", "oval", "hexagon"),
    "bird": ("eagle", "sparrow", "owl", "parrot", "penguin", "robin", "pigeon", "duck"),
    "fish": ("salmon", "trout", "tuna", "goldfish", "cod", "sardine"),
    "mammal": ("dog", "cow", "horse", "rabbit", "lion", "bear", "monkey", "elephant"),
    "insect": ("ant", "bee", "butterfly", "beetle", "fly", "mosquito", "grasshopper"),
    "metal": ("copper", "aluminum", "zinc", "nickel", "tin", "titanium"),
}
# categories whose members are animals: never use one as a distractor pool for another
_ANIMAL_CATS = {"bird", "fish", "mammal", "insect"}

# (thing, value) scales; comparisons only use items whose values differ clearly.
MASS_KG = {
    "an ant": 3e-6,
    "a bee": 1e-4,
    "a mouse": 0.02,
    "a frog": 0.1,
    "a rabbit": 2.0,
    "a cat": 4.0,
    "a dog": 25.0,
    "a sheep": 80.0,
    "a lion": 190.0,
    "a horse": 500.0,
    "a giraffe": 1200.0,
    "an elephant": 6000.0,
    "a blue whale": 150000.0,
}
OBJECT_MASS_KG = {
    "a feather": 0.001,
    "a paper clip": 0.002,
    "a pencil": 0.01,
    "an apple": 0.2,
    "a book": 1.0,
    "a brick": 3.0,
    "a bicycle": 12.0,
    "a grown man": 75.0,
    "a piano": 300.0,
    "a car": 1500.0,
    "a truck": 10000.0,
}
TEMPERATURE_C = {
    "an ice cube": -5.0,
    "snow": -2.0,
    "cold milk from the fridge": 4.0,
    "a glass of tap water": 15.0,
    "a warm bath": 38.0,
    "a cup of hot tea": 75.0,
    "boiling water": 100.0,
    "a hot oven": 220.0,
    "a campfire flame": 700.0,
    "the surface of the Sun": 5500.0,
}
SPEED_KMH = {
    "a snail": 0.05,
    "a turtle": 0.5,
    "a person walking": 5.0,
    "a bicycle": 20.0,
    "a horse galloping": 50.0,
    "a car on a highway": 110.0,
    "a high-speed train": 300.0,
    "a jet airplane": 900.0,
    "a rocket": 25000.0,
}
SCALES: tuple[tuple[dict[str, float], str, str, str], ...] = (
    # (scale, question for max, question for min, noun)
    (MASS_KG, "Which of these animals is the heaviest?", "Which of these animals is the lightest?", ""),
    (OBJECT_MASS_KG, "Which of these is the heaviest?", "Which of these is the lightest?", ""),
    (TEMPERATURE_C, "Which of these is the hottest?", "Which of these is the coldest?", ""),
    (SPEED_KMH, "Which of these is the fastest?", "Which of these is the slowest?", ""),
)

OPPOSITES = (
    ("hot", "cold"),
    ("big", "small"),
    ("up", "down"),
    ("fast", "slow"),
    ("day", "night"),
    ("happy", "sad"),
    ("open", "closed"),
    ("full", "empty"),
    ("wet", "dry"),
    ("loud", "quiet"),
    ("early", "late"),
    ("hard", "soft"),
    ("thick", "thin"),
    ("tall", "short"),
    ("first", "last"),
    ("inside", "outside"),
    ("push", "pull"),
    ("win", "lose"),
    ("buy", "sell"),
    ("rich", "poor"),
    ("clean", "dirty"),
    ("strong", "weak"),
    ("above", "below"),
    ("begin", "end"),
)
MONTHS = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
LEGS = {
    "a spider": 8,
    "an ant": 6,
    "a bee": 6,
    "a beetle": 6,
    "a dog": 4,
    "a cat": 4,
    "a horse": 4,
    "a cow": 4,
    "a lion": 4,
    "a chicken": 2,
    "a duck": 2,
    "a person": 2,
    "an ostrich": 2,
    "a snake": 0,
    "a fish": 0,
    "an octopus": 8,
    "a crab": 10,
}
BABY_ANIMALS = {
    "cat": "kitten",
    "dog": "puppy",
    "cow": "calf",
    "horse": "foal",
    "sheep": "lamb",
    "duck": "duckling",
    "frog": "tadpole",
    "goat": "kid",
    "bear": "cub",
    "pig": "piglet",
}
FLIERS = (
    "an eagle",
    "a bee",
    "a bat",
    "an airplane",
    "a butterfly",
    "an owl",
    "a parrot",
    "a helicopter",
    "a dragonfly",
)
NON_FLIERS = (
    "a dog",
    "a fish",
    "a cow",
    "a snake",
    "a car",
    "a turtle",
    "a rock",
    "a horse",
    "a spoon",
    "a frog",
    "a pig",
)
SWIMMERS = ("a fish", "a whale", "a shark", "an octopus", "a dolphin", "a jellyfish", "a seal")
LAND_ONLY = ("a lion", "a camel", "a horse", "an eagle", "an ant", "a squirrel", "a giraffe", "a goat", "a parrot")

# Science questions, fixed: (question, correct answer, distractors) — t2ray/tasks/data/reasoning_questions.jsonl
FACTS = question_table("facts")


def _mc(
    question: str,
    correct: str,
    distractors: Sequence[str],
    r: random.Random,
    category: str = "reasoning",
    n_options: int = 4,
) -> Example:
    pool = list(dict.fromkeys(d for d in distractors if d != correct))
    opts = [correct, *r.sample(pool, n_options - 1)]
    r.shuffle(opts)
    letter = "ABCD"[opts.index(correct)]
    prompt = f"Question: {question}\n{format_choices(opts)}\n{MC_SUFFIX}"
    return Example(id="", prompt=prompt, answer=letter, choices=tuple(opts), category=category)


def _pick_spread(r: random.Random, scale: dict[str, float], k: int, ratio: float) -> list[str]:
    """``k`` items whose values differ pairwise by at least ``ratio`` (multiplicatively, or by a
    margin of 10 units for values that can be zero or negative)."""
    items = list(scale)
    for _ in range(200):
        pick = r.sample(items, k)
        vals = sorted(scale[p] for p in pick)
        ok = all((b - a >= 10.0) if min(a, b) <= 0 else (b / a >= ratio) for a, b in pairwise(vals))
        if ok:
            return pick
    return r.sample(items, k)  # unreachable for the shipped scales


def _non_members(cat: str) -> list[str]:
    """The words that are not ``cat``s: those of the other categories (but no animal category for another)."""
    others = [c for c in CATEGORIES if c != cat and not (cat in _ANIMAL_CATS and c in _ANIMAL_CATS)]
    return [w for c in others for w in CATEGORIES[c] if w not in CATEGORIES[cat]]


def _with_article(noun: str) -> str:
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"


# ---- reasoning (training) -----------------------------------------------------------------------


def _category_member(r: random.Random) -> Example:
    cat = r.choice(list(CATEGORIES))
    correct = r.choice(CATEGORIES[cat])
    return _mc(f"Which of these is {_with_article(cat)}?", correct, _non_members(cat), r)


def _scale_extreme(r: random.Random) -> Example:
    """Comparisons; most of them between two things only (2 options)."""
    scale, qmax, qmin, _ = r.choice(SCALES)
    k = 2 if r.random() < 0.75 else 4
    pick = _pick_spread(r, scale, k, 3.0)
    if r.random() < 0.5:
        return _mc(qmax, max(pick, key=scale.__getitem__), pick, r, n_options=k)
    return _mc(qmin, min(pick, key=scale.__getitem__), pick, r, n_options=k)


def _number_extreme(r: random.Random) -> Example:
    k = 2 if r.random() < 0.75 else 4
    nums = [str(x) for x in r.sample(range(1, 100), k)]
    if r.random() < 0.5:
        return _mc("Which number is the largest?", max(nums, key=int), nums, r, n_options=k)
    return _mc("Which number is the smallest?", min(nums, key=int), nums, r, n_options=k)


def _opposite(r: random.Random) -> Example:
    a, b = r.choice(OPPOSITES)
    if r.random() < 0.5:
        a, b = b, a
    pool = [w for pair in OPPOSITES if a not in pair for w in pair]
    return _mc(f'What is the opposite of "{a}"?', b, pool, r)


def _calendar(r: random.Random) -> Example:
    seq, noun = (MONTHS, "month") if r.random() < 0.5 else (DAYS, "day of the week")
    i = r.randrange(len(seq))
    if r.random() < 0.5:
        return _mc(
            f"Which {noun} comes right after {seq[i]}?", seq[(i + 1) % len(seq)], [s for s in seq if s != seq[i]], r
        )
    return _mc(
        f"Which {noun} comes right before {seq[i]}?", seq[(i - 1) % len(seq)], [s for s in seq if s != seq[i]], r
    )


def _legs(r: random.Random) -> Example:
    animal = r.choice(list(LEGS))
    n = LEGS[animal]
    return _mc(f"How many legs does {animal} have?", str(n), [str(x) for x in (0, 2, 4, 6, 8, 10) if x != n], r)


def _baby(r: random.Random) -> Example:
    animal = r.choice(list(BABY_ANIMALS))
    return _mc(f"What is a baby {animal} called?", BABY_ANIMALS[animal], list(BABY_ANIMALS.values()), r)


def _can_fly(r: random.Random) -> Example:
    if r.random() < 0.5:
        return _mc("Which of these can fly?", r.choice(FLIERS), NON_FLIERS, r)
    return _mc("Which of these lives in water?", r.choice(SWIMMERS), LAND_ONLY, r)


def _fixed_question(table: tuple[tuple[str, str, tuple[str, ...]], ...]) -> Family:
    """A family that asks one of a table's fixed questions."""

    def ask(r: random.Random) -> Example:
        q, correct, distractors = r.choice(table)
        return _mc(q, correct, distractors, r)

    return ask


REASONING_FAMILIES: tuple[Family, ...] = (
    _category_member,
    _scale_extreme,
    _number_extreme,
    _opposite,
    _calendar,
    _legs,
    _baby,
    _can_fly,
    _fixed_question(FACTS),
)


# ---- reasoning-hard (unseen) --------------------------------------------------------------------

PEOPLE = (
    "Amy",
    "Ben",
    "Cara",
    "Dan",
    "Eva",
    "Finn",
    "Gina",
    "Hugo",
    "Iris",
    "Jon",
    "Kim",
    "Luis",
    "Mona",
    "Nick",
    "Olga",
    "Paul",
)
RELATIONS = (  # (comparative, superlative of the top, superlative of the bottom)
    ("taller", "the tallest", "the shortest"),
    ("older", "the oldest", "the youngest"),
    ("faster", "the fastest", "the slowest"),
    ("heavier", "the heaviest", "the lightest"),
)


def _transitive(r: random.Random) -> Example:
    names = r.sample(PEOPLE, 4)
    chain, outsider = names[:3], names[3]  # chain[0] > chain[1] > chain[2]
    comp, top, bottom = r.choice(RELATIONS)
    facts = [f"{chain[0]} is {comp} than {chain[1]}.", f"{chain[1]} is {comp} than {chain[2]}."]
    r.shuffle(facts)
    ask_top = r.random() < 0.5
    q = f"{' '.join(facts)} Who is {top if ask_top else bottom}?"
    return _mc(q, chain[0] if ask_top else chain[2], [chain[1], chain[2] if ask_top else chain[0], outsider], r)


def _not_member(r: random.Random) -> Example:
    cat = r.choice(list(CATEGORIES))
    members = r.sample(CATEGORIES[cat], 3)
    outsider = r.choice(_non_members(cat))
    opts = [outsider, *members]
    r.shuffle(opts)
    letter = "ABCD"[opts.index(outsider)]
    prompt = f"Question: Which of these is NOT {_with_article(cat)}?\n{format_choices(opts)}\n{MC_SUFFIX}"
    return Example(id="", prompt=prompt, answer=letter, choices=tuple(opts), category="reasoning")


def _day_arith(r: random.Random) -> Example:
    i, k = r.randrange(7), r.randint(2, 12)
    if k % 7 == 0:
        k += 1
    target = DAYS[(i + k) % 7]
    return _mc(
        f"If today is {DAYS[i]}, what day of the week will it be in {k} days?",
        target,
        [d for d in DAYS if d != target],
        r,
    )


def _sequence(r: random.Random) -> Example:
    a, d = r.randint(1, 30), r.randint(2, 9)
    if r.random() < 0.5:
        seq = [a + i * d for i in range(4)]
        nxt = a + 4 * d
    else:
        a, d = r.randint(1, 5), r.randint(2, 3)
        seq = [a * d**i for i in range(4)]
        nxt = a * d**4
    wrong = {nxt + 1, nxt - 1, nxt + d, seq[-1] + 1, nxt * 2, nxt - d - 1} - {nxt, seq[-1]}
    return _mc(
        f"What number comes next in the sequence {', '.join(map(str, seq))}?",
        str(nxt),
        [str(w) for w in sorted(wrong) if w > 0],
        r,
    )


def _two_conditions(r: random.Random) -> Example:
    k = r.randint(10, 60)
    even_big = 2 * r.randint(k // 2 + 1, k // 2 + 20)
    odd_big = 2 * r.randint(k // 2 + 1, k // 2 + 20) + 1
    even_small = 2 * r.randint(1, max(1, (k - 1) // 2))
    odd_small = 2 * r.randint(0, max(0, (k - 2) // 2)) + 1
    if r.random() < 0.5:
        q, correct = f"Which of these numbers is even and greater than {k}?", even_big
    else:
        q, correct = f"Which of these numbers is odd and greater than {k}?", odd_big
    cands = [even_big, odd_big, even_small, odd_small]
    distractors = [str(c) for c in cands if c != correct]
    return _mc(q, str(correct), distractors, r)


def _more_than(r: random.Random) -> Example:
    a, b = r.sample(PEOPLE, 2)
    base, extra = r.randint(5, 40), r.randint(2, 15)
    item = r.choice(("marbles", "books", "stamps", "coins", "stickers"))
    if r.random() < 0.5:
        q = f"{a} has {extra} more {item} than {b}. {b} has {base} {item}. How many {item} does {a} have?"
        ans = base + extra
    else:
        q = f"{a} has {extra} fewer {item} than {b}. {b} has {base + extra} {item}. How many {item} does {a} have?"
        ans = base
    wrong = {ans + extra, abs(ans - extra), ans + 1, ans - 1, base + 2 * extra} - {ans}
    return _mc(q, str(ans), [str(w) for w in sorted(wrong) if w > 0], r)


CAUSE_EFFECT = question_table("cause_effect")


HARD_FAMILIES: tuple[Family, ...] = (
    _transitive,
    _not_member,
    _day_arith,
    _sequence,
    _two_conditions,
    _more_than,
    _fixed_question(CAUSE_EFFECT),
)


_FIXED_STEMS = frozenset(f"Question: {q}" for q, _, _ in (*FACTS, *CAUSE_EFFECT))


def _dedupe_key(ex: Example) -> str:
    """What makes two generated questions "the same" (so they never land in two splits).

    A specific question (a fact, a sequence, a chain of comparisons, a calendar step) may
    appear once in the whole pool, whatever its options. A generic stem ("Which of these is a
    fruit?", "Which number is the largest?") is only the same question with the same set of
    options, in any order.
    """
    stem = ex.prompt.split("\n", 1)[0]
    generic = stem.startswith(("Question: Which of these", "Question: Which number is the"))
    if generic and stem not in _FIXED_STEMS:
        return stem + "|" + "|".join(sorted(ex.choices or ()))
    return stem


def _reasoning_task(
    name: str, families: Sequence[Family], sizes: dict[str, int], seed: int, description: str, **options: Any
) -> GradedTask:
    """Multiple choice, graded on the letter or the text of the option."""
    draw = pick_family(families)
    return generated_task(
        name, "reasoning", "choice", draw, sizes, seed, key=_dedupe_key, description=description, **options
    )


def make_reasoning_task(seed: int = 0) -> GradedTask:
    description = "2- or 4-option everyday/simple-science questions; answer with a letter"
    return _reasoning_task("reasoning", REASONING_FAMILIES, TRAIN_SIZES, seed, description, max_new_tokens=32)


def make_reasoning_hard_task(seed: int = 0) -> GradedTask:
    description = "4-option multi-step comparisons, sequences and cause-effect questions"
    return _reasoning_task("reasoning-hard", HARD_FAMILIES, UNSEEN_SIZES, seed, description, max_new_tokens=48)
