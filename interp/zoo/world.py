"""The procedural world the zoo's models live in: entities, facts, boxes, intents, sums.

Everything here is a pure function of a seed, so the text a base model is
pretrained on, the tasks it is tested on and the vocabulary its tokenizer
knows are reproducible without any download. Every word the world uses is one
token of the zoo's word-level tokenizer, so every answer is a single token.

Four kinds of knowledge, chosen to exercise the four methods in methods.md:

- **facts** (``Bodo lives in`` -> `` Paris``): memorised in pretraining, the
  model's prior knowledge;
- **tracking** (``The apple is in Box O, ... Box O contains the`` -> `` apple``):
  pretraining shows two boxes, the task two to five, so the base tracks partly (§3);
- **intent** (context QA with an instruction to use or ignore the context):
  pretraining shows the format, instruction first, with answers drawn at random
  from context or prior, so the base knows both answers but not which to give;
  the task ends with a short instruction whose last word is the intent
  (``… Instruction: consider the context: Only``), so the intent reaches the
  last token, where the context knob is read (§4);
- **add** (``3 + 4 =`` -> `` 7``): pretraining states the table in words
  (``3 plus 4 is 7``); the task asks in symbols, a thin wrapper to learn.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from interp.errors import TaskError
from interp.tasks import Task

CITIES = ["Paris", "Rome", "Lima", "Oslo", "Cairo", "Delhi", "Tokyo", "Berlin", "Madrid", "Vienna", "Dublin", "Prague", "Lagos", "Quito", "Seoul", "Hanoi"]
JOBS = ["baker", "doctor", "farmer", "pilot", "teacher", "painter", "nurse", "tailor", "miner", "sailor", "singer", "judge"]
OBJECTS = ["apple", "car", "ball", "book", "cup", "key", "hat", "shoe", "lamp", "coin", "ring", "pen", "map", "bell", "fork", "drum", "kite", "rope", "vase", "sock", "bowl", "clock", "doll", "flag", "glove", "jar", "leaf", "mask", "nut", "pipe"]
LABELS = tuple("ABCDEFGHJKLMNOPQRSTUVWXZ")
MAX_DIGIT = 9
SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>")
SPLITS = ("train", "test")
TEST_FRACTION = 0.3
PRETRAIN_TRACKING_BOXES = (2,)
PRETRAIN_TRACKING_QUERIES = 6
TASK_TRACKING_BOXES = (2, 5)

# Instructions differ in one token so a prompt and its opposite-intent
# counterfactual have equal lengths and align position by position.
# Pretraining documents show them first (with random answers).
INSTRUCTIONS = {
    "ctx": "Only consider the context in answering the query.",
    "prior": "Never consider the context in answering the query.",
}
# The intent task ends with the instruction, its one intent word last: the
# prompt's last token is where the context knob is read (methods.md §4), and a
# two-layer model has no later position to move the intent to, nor the depth to
# route it to the last token from further back (with the instruction sentence
# before ``Answer:`` no rank-1 edit of the last token's residual steered it).
TASK_INSTRUCTION = " Instruction: consider the context: {word}"
INTENT_WORDS = {"ctx": "Only", "prior": "Never"}
ATTRIBUTES = ("city", "job")
_STATEMENT = {"city": "{name} lives in", "job": "{name} works as a"}
_QUERY = {"city": "Where does {name} live?", "job": "What is the job of {name}?"}
_FUNCTION_WORDS = ["The", "the", "is", "in", "Box", "contains", "and", ",", ".", ":", "?", "Context", "Instruction", "Query", "Answer", "Only", "Never", "consider", "context", "answering", "query", "lives", "works", "as", "a", "Where", "does", "live", "What", "job", "of", "plus", "+", "="]

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z"]
_VOWELS = ["a", "e", "i", "o", "u"]


def _names(count: int, seed: int) -> tuple[str, ...]:
    """``count`` distinct pronounceable names (CVCV or CVCVC), capitalised."""
    rng = random.Random(f"names-{seed}")
    names: list[str] = []
    seen: set[str] = set()
    while len(names) < count:
        parts = [rng.choice(_ONSETS), rng.choice(_VOWELS), rng.choice(_ONSETS), rng.choice(_VOWELS)]
        if rng.random() < 0.4:
            parts.append(rng.choice("nlrs"))
        name = "".join(parts).capitalize()
        if name not in seen:
            seen.add(name)
            names.append(name)
    return tuple(names)


def _bucket(key: str) -> str:
    """Deterministic train/test assignment of one item key (stable across runs and Pythons)."""
    value = int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "little") / 2**32
    return "test" if value < TEST_FRACTION else "train"


@dataclass(frozen=True)
class World:
    """Entities with a city and a job each; a function of ``seed`` and ``n_entities``."""

    seed: int = 0
    n_entities: int = 120
    names: tuple[str, ...] = field(init=False)
    city_of: dict[str, str] = field(init=False, repr=False)
    job_of: dict[str, str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        names = _names(self.n_entities, self.seed)
        rng = random.Random(f"facts-{self.seed}")
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "city_of", {n: rng.choice(CITIES) for n in names})
        object.__setattr__(self, "job_of", {n: rng.choice(JOBS) for n in names})

    # -- vocabulary -------------------------------------------------------
    def vocabulary(self) -> list[str]:
        """Every token the world can write, specials first, in a fixed order."""
        numbers = [str(i) for i in range(2 * MAX_DIGIT + 1)]
        words = [*_FUNCTION_WORDS, *self.names, *CITIES, *JOBS, *OBJECTS, *LABELS, *numbers]
        out = list(SPECIAL_TOKENS)
        for word in words:
            if word not in out:
                out.append(word)
        return out

    def value(self, name: str, attribute: str) -> str:
        return self.city_of[name] if attribute == "city" else self.job_of[name]

    def entities(self, split: str) -> list[str]:
        """Entities whose task items belong to ``split`` (the split is by entity)."""
        _check_split(split)
        return [n for n in self.names if _bucket(f"entity-{self.seed}-{n}") == split]

    # -- sentences -------------------------------------------------------
    def statement(self, name: str, attribute: str) -> str:
        return _STATEMENT[attribute].format(name=name)

    def intent_prompt(self, name: str, attribute: str, context_value: str, intent: str | None,
                      instruction_first: bool = False) -> str:
        """A context / query prompt, with the instruction for ``intent`` (None: no instruction).

        Task prompts end with the instruction, intent word last
        (``… Instruction: consider the context: Only``); without one they end
        at ``Answer:``. Pretraining documents (``instruction_first``) put the
        full instruction sentence first and end at ``Answer:``, so the base
        never saw the task's form.
        """
        context = f"Context: {self.statement(name, attribute)} {context_value}."
        query = f" Query: {_QUERY[attribute].format(name=name)}"
        if instruction_first:
            instruction = f" Instruction: {INSTRUCTIONS[intent]}" if intent else ""
            return f"{context}{instruction}{query} Answer:"
        if intent is None:
            return f"{context}{query} Answer:"
        return f"{context}{query}{TASK_INSTRUCTION.format(word=INTENT_WORDS[intent])}"

    # -- pretraining -----------------------------------------------------
    def pretraining_document(self, rng: random.Random, mix: dict[str, float] | None = None,
                             tracking_boxes: Sequence[int] = PRETRAIN_TRACKING_BOXES,
                             tracking_labels: int = len(LABELS)) -> str:
        """One pretraining document drawn from ``mix`` (default :data:`PRETRAIN_MIX`).

        Tracking documents have ``tracking_boxes`` boxes: fewer than the task
        asks about, so the base tracks only partly.
        """
        kinds, weights = zip(*(mix or PRETRAIN_MIX).items())
        kind = rng.choices(kinds, weights)[0]
        if kind == "tracking":
            return _doc_tracking(self, rng, tracking_boxes, LABELS[:tracking_labels])
        return _DOCUMENTS[kind](self, rng)

    def pretraining_text(self, n: int = 512, seed: int = 1_000_003,
                         mix: dict[str, float] | None = None) -> list[str]:
        """``n`` documents from the pretraining mixture, drawn with ``seed``.

        The default seed is never used for training, so this is held-out text
        for a "pretraining loss" measure (facts recur, as in any corpus).
        """
        rng = random.Random(f"pretrain-{self.seed}-{seed}")
        return [self.pretraining_document(rng, mix) for _ in range(n)]


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise TaskError(f"split must be one of {SPLITS}, got {split!r}")


# ---------------------------------------------------------------------------
# pretraining documents
# ---------------------------------------------------------------------------



def _doc_fact(world: World, rng: random.Random) -> str:
    name, attribute = rng.choice(world.names), rng.choice(ATTRIBUTES)
    return f"{world.statement(name, attribute)} {world.value(name, attribute)}."


def _doc_query(world: World, rng: random.Random) -> str:
    name, attribute = rng.choice(world.names), rng.choice(ATTRIBUTES)
    question = _QUERY[attribute].format(name=name)
    return f"Query: {question} Answer: {world.value(name, attribute)}."


def _doc_intent(world: World, rng: random.Random) -> str:
    """Context QA whose answer is context or prior at random, whatever the instruction says."""
    name, attribute = rng.choice(world.names), rng.choice(ATTRIBUTES)
    true = world.value(name, attribute)
    other = rng.choice([v for v in (CITIES if attribute == "city" else JOBS) if v != true])
    intent = rng.choice(["ctx", "prior", None])
    answer = rng.choice([other, true])
    return f"{world.intent_prompt(name, attribute, other, intent, instruction_first=True)} {answer}."


def _doc_tracking(world: World, rng: random.Random,
                  boxes: Sequence[int] = PRETRAIN_TRACKING_BOXES,
                  labels: Sequence[str] = LABELS) -> str:
    """Boxes, then :data:`PRETRAIN_TRACKING_QUERIES` questions about random boxes.

    Many queries per document give the slow-to-form lookup circuit many
    supervised examples per step (as in multi-query associative recall).
    """
    n_boxes = rng.choice(boxes)
    objects, labels = rng.sample(OBJECTS, n_boxes), rng.sample(labels, n_boxes)
    text = _box_statements(objects, labels)
    for _ in range(PRETRAIN_TRACKING_QUERIES):
        i = rng.randrange(n_boxes)
        text += f" Box {labels[i]} contains the {objects[i]}."
    return text


def _doc_sum(world: World, rng: random.Random) -> str:
    a, b = rng.randint(0, MAX_DIGIT), rng.randint(0, MAX_DIGIT)
    return f"{a} plus {b} is {a + b}."


def _doc_repeat(world: World, rng: random.Random) -> str:
    """A random run of objects and letters, written twice.

    Copying a repeated sequence is the easiest in-context skill a transformer
    learns (induction heads); it forms in the first hundred steps and gives
    entity tracking a lookup mechanism to build on.
    """
    words = rng.choices([*OBJECTS, *LABELS], k=rng.randint(4, 12))
    run = " ".join(words)
    return f"{run}. {run}."


def _doc_pairs(world: World, rng: random.Random) -> str:
    """Object-letter pairs, then letters followed by their objects: ``apple O car T. T car O apple.``

    The cleanest form of the lookup entity tracking needs (find the letter,
    read what came just before it); it forms fast and tracking builds on it.
    """
    n = rng.randint(2, 6)
    objects, labels = rng.sample(OBJECTS, n), rng.sample(LABELS, n)
    context = " ".join(f"{o} {b}" for o, b in zip(objects, labels))
    queries = " ".join(f"{labels[i]} {objects[i]}" for i in rng.sample(range(n), n))
    return f"{context}. {queries}."


_DOCUMENTS: dict[str, Callable[[World, random.Random], str]] = {
    "pairs": _doc_pairs,
    "repeat": _doc_repeat,
    "fact": _doc_fact,
    "query": _doc_query,
    "intent": _doc_intent,
    "tracking": _doc_tracking,
    "sum": _doc_sum,
}
PRETRAIN_MIX = {"fact": 0.25, "query": 0.2, "intent": 0.15, "tracking": 0.3, "sum": 0.1}


# ---------------------------------------------------------------------------
# tasks
# ---------------------------------------------------------------------------


def _box_statements(objects: Sequence[str], labels: Sequence[str]) -> str:
    """``The apple is in Box O, the car is in Box T, and the ... .``"""
    clauses = [f"the {o} is in Box {b}" for o, b in zip(objects, labels)]
    if len(clauses) > 1:
        clauses[-1] = "and " + clauses[-1]
    body = ", ".join(clauses)
    return body[0].upper() + body[1:] + "."


def _tracking_item(rng: random.Random, n_boxes: int) -> tuple[str, str, str, str]:
    """(prompt, answer, counterfactual prompt, counterfactual answer) with ``n_boxes`` boxes."""
    objects = rng.sample(OBJECTS, n_boxes)
    labels = rng.sample(LABELS, n_boxes)
    body = _box_statements(objects, labels)
    query, other = rng.sample(range(n_boxes), 2)
    prompt = f"{body} Box {labels[query]} contains the"
    counterfactual = f"{body} Box {labels[other]} contains the"
    return prompt, f" {objects[query]}", counterfactual, f" {objects[other]}"


def tracking_task(world: World, split: str = "test", n: int | None = None, seed: int = 0) -> Task:
    """Entity tracking (methods.md §3) with 2-5 boxes (pretraining shows 2); counterfactual swaps the query label."""
    _check_split(split)
    n = 400 if n is None else n
    rng = random.Random(f"tracking-{world.seed}-{split}-{seed}")
    rows: list[tuple[str, str, str, str]] = []
    boxes: list[int] = []
    seen: set[str] = set()
    low, high = TASK_TRACKING_BOXES
    while len(rows) < n:
        n_boxes = rng.randint(low, high)
        row = _tracking_item(rng, n_boxes)
        if row[0] in seen or _bucket(f"tracking-{row[0]}") != split:
            continue
        seen.add(row[0])
        rows.append(row)
        boxes.append(n_boxes)
    prompts, answers, cf_prompts, cf_answers = (list(c) for c in zip(*rows))
    return Task(
        name="tracking",
        prompts=prompts,
        answers=answers,
        counterfactual_prompts=cf_prompts,
        counterfactual_answers=cf_answers,
        extras={"n_boxes": boxes, "chance": [1.0 / b for b in boxes]},
        description="Box X contains the -> the object put in Box X; counterfactual asks another box",
    )


def facts_task(world: World, split: str = "test", n: int | None = None, seed: int = 0) -> Task:
    """Fact recall (``Bodo lives in`` -> `` Paris``); counterfactual asks a different-answer entity."""
    names = world.entities(split)
    rng = random.Random(f"facts-{world.seed}-{split}-{seed}")
    prompts, answers, cf_prompts, cf_answers, attrs, entities = [], [], [], [], [], []
    for name in names:
        for attribute in ATTRIBUTES:
            value = world.value(name, attribute)
            other = rng.choice([m for m in names if world.value(m, attribute) != value])
            prompts.append(world.statement(name, attribute))
            answers.append(f" {value}")
            cf_prompts.append(world.statement(other, attribute))
            cf_answers.append(f" {world.value(other, attribute)}")
            attrs.append(attribute)
            entities.append(name)
    task = Task(
        name="facts",
        prompts=prompts,
        answers=answers,
        counterfactual_prompts=cf_prompts,
        counterfactual_answers=cf_answers,
        extras={"attribute": attrs, "entity": entities},
        description="recall a memorised attribute; counterfactual names another entity",
    )
    return task if n is None else task.subset(slice(0, n))


def _intent_rows(world: World, split: str, seed: int, pairs: int | None) -> list[dict]:
    """One row per (context, query) item: entity, attribute, context value, prior value."""
    rng = random.Random(f"intent-{world.seed}-{split}-{seed}")
    rows = []
    for name in world.entities(split):
        for attribute in ATTRIBUTES:
            true = world.value(name, attribute)
            pool = [v for v in (CITIES if attribute == "city" else JOBS) if v != true]
            for other in rng.sample(pool, 3):
                rows.append({"entity": name, "attribute": attribute, "ctx": other, "prior": true})
    rng.shuffle(rows)
    return rows if pairs is None else rows[:pairs]


def intent_task(world: World, split: str = "test", n: int | None = None, seed: int = 0) -> Task:
    """Intent-conditioned context QA (methods.md §4); prompts come in adjacent (ctx, prior) pairs.

    ``n`` counts prompts (two per item). Counterfactual = the same item with the
    other intent, so patching it flips which answer is correct.
    """
    rows = _intent_rows(world, split, seed, None if n is None else max(n // 2, 1))
    prompts, answers, cf_prompts, cf_answers = [], [], [], []
    extras: dict[str, list] = {k: [] for k in ("item", "intent", "ctx_answer", "prior_answer",
                                               "entity", "attribute")}
    for index, row in enumerate(rows):
        item = f"{row['entity']}-{row['attribute']}-{row['ctx']}"
        for intent, opposite in (("ctx", "prior"), ("prior", "ctx")):
            prompts.append(world.intent_prompt(row["entity"], row["attribute"], row["ctx"], intent))
            cf_prompts.append(
                world.intent_prompt(row["entity"], row["attribute"], row["ctx"], opposite)
            )
            answers.append(f" {row[intent]}")
            cf_answers.append(f" {row[opposite]}")
            extras["item"].append(item)
            extras["intent"].append(intent)
            extras["ctx_answer"].append(f" {row['ctx']}")
            extras["prior_answer"].append(f" {row['prior']}")
            extras["entity"].append(row["entity"])
            extras["attribute"].append(row["attribute"])
    return Task(
        name="intent",
        prompts=prompts,
        answers=answers,
        counterfactual_prompts=cf_prompts,
        counterfactual_answers=cf_answers,
        extras=extras,
        description="answer from the context or from memory, as the instruction says",
    )


def intent_bare_task(world: World, split: str = "test", n: int | None = None, seed: int = 0) -> Task:
    """The intent items with no instruction (for steering); the answer given is the context's."""
    rows = _intent_rows(world, split, seed, n)
    return Task(
        name="intent_bare",
        prompts=[world.intent_prompt(r["entity"], r["attribute"], r["ctx"], None) for r in rows],
        answers=[f" {r['ctx']}" for r in rows],
        extras={
            "item": [f"{r['entity']}-{r['attribute']}-{r['ctx']}" for r in rows],
            "ctx_answer": [f" {r['ctx']}" for r in rows],
            "prior_answer": [f" {r['prior']}" for r in rows],
        },
        description="context QA without an instruction; read ctx_answer / prior_answer",
    )


def add_task(world: World, split: str = "test", n: int | None = None, seed: int = 0) -> Task:
    """``a + b =`` -> `` a+b`` for digits a, b; split by the (a, b) pair.

    Counterfactual changes ``b`` to another digit giving a different sum.
    """
    _check_split(split)
    rng = random.Random(f"add-{world.seed}-{split}-{seed}")
    pairs = [(a, b) for a in range(MAX_DIGIT + 1) for b in range(MAX_DIGIT + 1)]
    pairs = [p for p in pairs if _bucket(f"add-{world.seed}-{p[0]}-{p[1]}") == split]
    rng.shuffle(pairs)
    cf = [(a, rng.choice([c for c in range(MAX_DIGIT + 1) if c != b])) for a, b in pairs]
    task = Task(
        name="add",
        prompts=[f"{a} + {b} =" for a, b in pairs],
        answers=[f" {a + b}" for a, b in pairs],
        counterfactual_prompts=[f"{a} + {c} =" for a, c in cf],
        counterfactual_answers=[f" {a + c}" for a, c in cf],
        extras={"a": [a for a, _ in pairs], "b": [b for _, b in pairs]},
        description="add two digits written in symbols (pretraining wrote sums in words)",
    )
    return task if n is None else task.subset(slice(0, n))


TASKS: dict[str, Callable[..., Task]] = {
    "facts": facts_task,
    "tracking": tracking_task,
    "intent": intent_task,
    "intent_bare": intent_bare_task,
    "add": add_task,
}


def make_task(world: World, name: str, split: str = "test", n: int | None = None,
              seed: int = 0) -> Task:
    """Build task ``name`` on ``world``; train and test splits never share an item."""
    if name not in TASKS:
        raise TaskError(f"unknown zoo task {name!r}; choose one of {sorted(TASKS)}")
    return TASKS[name](world, split=split, n=n, seed=seed)
