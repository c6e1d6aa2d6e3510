"""A synthetic instruction domain for the quality benchmark (`dskd-pipe recipe quality`): a small world of towns,
generated deterministically from a seed, and instructions about it whose answers carry real uncertainty.

Why synthetic: on two CPU cores, models small enough to train in minutes learn little of real instruction data
(a d256 x 4 teacher SFT'd on 4,000 Dolly examples reached 6.2 nats/token), so no student could show what a teacher
knows. A narrow domain makes a small teacher strong, and a known generator makes the benchmark honest: every answer
is drawn from a stated distribution, and each record carries the negative log-likelihood of the draw that made it
(`nll`), so the floor any model can reach is known.

The world (`build_world`): `n_towns` towns with made-up names (syllables + a suffix), each with a region, a size, a
main product, a river (or none), a festival month and 2-3 neighbours in its region. Instructions (`TASKS`, drawn
with `TASK_WEIGHTS`), answers drawn uniformly among their stated choices:
    describe   "Tell me about T." -> the town's size and region, then 1-3 of its other facts in a random order,
               each in one of three phrasings
    product    "What is T known for?" -> one of three phrasings of its product
    river      "Which river flows through T?" -> one of two phrasings (or of "no river")
    festival   "When is the festival in T?" -> one of three phrasings of its month
    region     "Name a town in R." -> ANY town of region R (uniform), in one of two phrasings
    buy        "Where can I buy P?" -> ANY town that makes P (uniform), in one of two phrasings
    neighbours "Which towns are near T?" -> its neighbours in a random order, one of two phrasings
    trip       "Plan a short trip starting in T." -> a random walk of 2-3 stops over neighbours, facts at each stop
A draw's `nll` sums -log(1 / number of choices) over its choices; it is the exact NLL of the text whenever no
other draw writes the same text (true here except in rare coincidences, which only make `nll` an upper bound).

Files (`write_world_files`), JSONL records with `instruction`, `input` (empty), `output`, `task`, `nll`:
    teacher_train   the teacher's training set (large)
    student_train   the first `n_student_train` records of teacher_train: the students' limited data, which the
                    teacher also saw (as a real teacher SFT'd on the task's train set has)
    dev             fresh draws, for hyper-parameters and model selection
    test            fresh draws with `n_references` answers per prompt (the first is the gold for NLL; ROUGE-L
                    takes the maximum over all, spec/evaluation.md)
    pretrain        (optional) the same kinds of text about ANOTHER world (another seed): language and format
                    without this world's facts, for a student base that is pretrained like a real student is
Randomness comes only from random.Random(seed).random(), so the files are the same on every platform.
"""
from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

REGIONS = (("the Northern Marches", "in"), ("the Salt Coast", "on"), ("the Green Vale", "in"),
           ("the Iron Hills", "in"), ("the Lake Country", "in"), ("the Red Plains", "on"))
PRODUCTS = ("wool", "salt", "copper", "apples", "honey", "timber", "glass", "cheese", "linen", "silver", "pottery",
            "wine")
SIZES = ("village", "market town", "city")
SIZE_WEIGHTS = (0.5, 0.35, 0.15)
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")
ONSETS = ("b", "br", "c", "d", "dr", "f", "g", "gr", "h", "k", "l", "m", "n", "p", "r", "s", "st", "t", "th", "v",
          "w", "z")
VOWELS = ("a", "e", "i", "o", "u", "ai", "ea", "ou")
CODAS = ("", "", "n", "r", "l", "s", "th", "m", "sk", "nd")
SUFFIXES = ("ford", "holm", "wick", "by", "ton", "mere", "dale", "stead", "gate", "port", "", "")
RIVER_SUFFIXES = ("", "water", "burn", "rill")
WEATHERS = ("sunny", "rainy", "windy", "foggy", "snowy", "cloudy")
DISHES = ("barley soup", "apple cake", "smoked fish", "mutton stew", "honey bread", "onion pie", "river trout",
          "plum dumplings", "goat cheese", "salted pork", "mushroom broth", "pear tart", "roast duck", "bean porridge",
          "pickled herring", "nut bread", "cabbage rolls", "pepper sausage")
TASKS = ("describe", "product", "river", "festival", "neighbours", "region", "buy", "weather", "food", "trip")
TASK_WEIGHTS = (0.18, 0.05, 0.05, 0.05, 0.05, 0.08, 0.08, 0.14, 0.14, 0.18)
FILES = ("teacher_train", "student_train", "dev", "test", "pretrain")


@dataclass(frozen=True)
class Town:
    name: str
    region: int  # index into REGIONS
    size: str
    product: str
    river: str  # "" = no river
    month: str
    neighbours: tuple[str, ...]
    weather: tuple[float, ...]  # probabilities over WEATHERS
    dishes: tuple[str, ...]  # three local dishes
    dish_weights: tuple[float, ...]  # their probabilities


class Draws:
    """Uniform choices from random.Random(seed).random() only, with the running NLL of the choices made."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.nll = 0.0

    def index(self, n: int) -> int:
        self.nll += math.log(n)
        return min(int(self.rng.random() * n), n - 1)

    def choice(self, options):
        return options[self.index(len(options))]

    def weighted(self, options, weights, count: bool = False):
        """A choice with probabilities proportional to `weights`; counted in `nll` only when `count` (an answer's
        choice, not one of the world's facts)."""
        total = sum(weights)
        r, acc = self.rng.random() * total, 0.0
        k = len(options) - 1
        for i, w in enumerate(weights):
            acc += w
            if r < acc:
                k = i
                break
        if count:
            self.nll -= math.log(weights[k] / total)
        return options[k]

    def simplex(self, n: int) -> tuple[float, ...]:
        """A draw from the flat Dirichlet over n outcomes (normalised exponentials), rounded to 3 decimals."""
        e = [-math.log(1.0 - self.rng.random()) for _ in range(n)]
        p = [max(0.001, round(x / sum(e), 3)) for x in e]
        return tuple(x / sum(p) for x in p)

    def permutation(self, items) -> list:
        items, out = list(items), []
        while items:
            out.append(items.pop(self.index(len(items))))
        return out

    def reset(self) -> None:
        self.nll = 0.0


def _name(draws: Draws, syllables: int, suffixes) -> str:
    parts = [draws.choice(ONSETS) + draws.choice(VOWELS) + draws.choice(CODAS) for _ in range(syllables)]
    return ("".join(parts) + draws.choice(suffixes)).capitalize()


def build_world(seed: int, n_towns: int) -> list[Town]:
    """`n_towns` towns with distinct names and their facts; every region, product and size occurs."""
    if n_towns < 2 * len(REGIONS):
        raise ValueError(f"n_towns must be >= {2 * len(REGIONS)} (two per region), found {n_towns}")
    draws = Draws(seed)
    names: list[str] = []
    while len(names) < n_towns:
        name = _name(draws, 1 + draws.index(2), SUFFIXES)
        if len(name) >= 4 and name not in names:
            names.append(name)
    rivers: list[str] = []
    while len(rivers) < 10:
        river = _name(draws, 1 + draws.index(2), RIVER_SUFFIXES)
        if len(river) >= 3 and river not in rivers and river not in names:
            rivers.append(river)
    # Round-robin over shuffled regions and products: each has towns, the rest is random.
    regions = [i % len(REGIONS) for i in range(n_towns)]
    products = [PRODUCTS[i % len(PRODUCTS)] for i in range(n_towns)]
    regions, products = draws.permutation(regions), draws.permutation(products)
    facts = []
    for i, name in enumerate(names):
        river = "" if draws.rng.random() < 0.3 else draws.choice(rivers)
        facts.append((name, regions[i], draws.weighted(SIZES, SIZE_WEIGHTS), products[i], river,
                      draws.choice(MONTHS)))
    towns = []
    for name, region, size, product, river, month in facts:
        same = [f[0] for f in facts if f[1] == region and f[0] != name]
        k = min(len(same), 2 + draws.index(2))
        neighbours = tuple(draws.permutation(same)[:k])
        dishes = tuple(draws.permutation(DISHES)[:3])
        towns.append(Town(name, region, size, product, river, month, neighbours, draws.simplex(len(WEATHERS)),
                          dishes, draws.simplex(3)))
    return towns


def _listing(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _article(size: str) -> str:
    return "an" if size[0] in "aeiou" else "a"


def _where(region: int) -> str:
    name, prep = REGIONS[region]
    return f"{prep} {name}"


def _fact(d: Draws, town: Town, kind: str, subject: str) -> str:
    """One sentence about `town`; `subject` is its name or "It"."""
    if kind == "product":
        return d.choice((f"{subject} is known for its {town.product}.",
                         f"The {town.product} of {town.name} is famous across the land." if subject != "It"
                         else f"Its {town.product} is famous across the land.",
                         f"Most people in {town.name} work with {town.product}." if subject != "It"
                         else f"Most people there work with {town.product}."))
    if kind == "river":
        if not town.river:
            return d.choice((f"{subject} has no river.", f"No river flows through {town.name}." if subject != "It"
                             else "No river flows through it."))
        return d.choice((f"The {town.river} flows through {town.name if subject != 'It' else 'it'}.",
                         f"{subject} stands on the banks of the {town.river}.",
                         f"{subject} sits on the river {town.river}."))
    if kind == "festival":
        return d.choice((f"{subject} holds its festival in {town.month}.",
                         f"Every {town.month} {town.name if subject != 'It' else 'it'} holds a great festival.",
                         f"The festival of {town.name} falls in {town.month}." if subject != "It"
                         else f"Its festival falls in {town.month}."))
    if kind == "neighbours":
        near = _listing(d.permutation(town.neighbours))
        return d.choice((f"{subject} lies close to {near}.", f"Its nearest neighbours are {near}." if subject == "It"
                         else f"The nearest neighbours of {town.name} are {near}."))
    raise ValueError(kind)


INSTRUCTIONS = {
    "describe": ("Tell me about {t}.", "Describe the town of {t}.", "What is {t} like?"),
    "product": ("What is {t} known for?", "What does {t} produce?"),
    "river": ("Which river flows through {t}?", "Is there a river in {t}?"),
    "festival": ("When is the festival in {t}?", "In which month does {t} hold its festival?"),
    "neighbours": ("Which towns are near {t}?", "What are the neighbours of {t}?"),
    "region": ("Name a town {where}.", "Can you name a place {where}?"),
    "buy": ("Where can I buy {p}?", "Which town should I visit for {p}?"),
    "weather": ("What is the weather like in {t} today?", "How is the weather in {t}?"),
    "food": ("What should I eat in {t}?", "What food is good in {t}?"),
    "trip": ("Plan a short trip starting in {t}.", "Suggest a journey that begins in {t}."),
}


def _instruction(d: Draws, task: str, town: Town) -> str:
    return d.choice(INSTRUCTIONS[task]).format(t=town.name, where=_where(town.region), p=town.product)


def _response(d: Draws, task: str, town: Town, towns: list[Town], by_name: dict) -> str:
    """One answer to the instruction of `task` about `town` (or about its region / product)."""
    t = town.name
    if task == "describe":
        first = d.choice((f"{t} is {_article(town.size)} {town.size} {_where(town.region)}.",
                          f"{t} is {_article(town.size)} {town.size}. It lies {_where(town.region)}."))
        kinds = d.permutation(("product", "river", "festival", "neighbours"))[:1 + d.index(3)]
        return " ".join([first] + [_fact(d, town, k, "It") for k in kinds])
    if task in ("product", "river", "festival", "neighbours"):
        return _fact(d, town, task, t)
    if task == "region":
        where = _where(town.region)
        pick = d.choice([x for x in towns if x.region == town.region])
        return d.choice((f"{pick.name} is {_article(pick.size)} {pick.size} {where}.", f"One example is {pick.name}."))
    if task == "buy":
        p = town.product
        pick = d.choice([x for x in towns if x.product == p])
        return d.choice((f"You can buy {p} in {pick.name}.", f"Try {pick.name}, which is known for its {p}."))
    if task == "weather":
        w = d.weighted(WEATHERS, town.weather, count=True)
        return d.choice((f"It is {w} in {t} today.", f"The weather in {t} is {w} today."))
    if task == "food":
        dish = d.weighted(town.dishes, town.dish_weights, count=True)
        return d.choice((f"Try the {dish}.", f"You should eat the {dish} in {t}.", f"The {dish} of {t} is very good."))
    if task == "trip":
        lines = [f"Start in {t}, {_article(town.size)} {town.size} known for its {town.product}."]
        here, seen = town, {t}
        for _ in range(1 + d.index(2)):
            options = [n for n in here.neighbours if n not in seen]
            if not options:
                break
            here = by_name[d.choice(options)]
            seen.add(here.name)
            dish = d.weighted(here.dishes, here.dish_weights, count=True)
            lines.append(d.choice((f"Then travel to {here.name}, where you can buy {here.product}.",
                                   f"Next, visit {here.name} for its {here.product}.",
                                   f"Go on to {here.name} and try the {dish}.")))
        lines.append(d.choice(("Enjoy the journey!", "Have a good trip!")))
        return " ".join(lines)
    raise ValueError(task)


def draw_examples(towns: list[Town], n: int, seed: int, n_references: int = 1) -> list[dict]:
    """`n` records: a task (by TASK_WEIGHTS), a town and an instruction phrasing (uniform), then `n_references`
    answers drawn independently for that instruction; `nll` is the first answer's (the prompt is given, so only
    the answer's choices count)."""
    d = Draws(seed)
    by_name = {x.name: x for x in towns}
    records = []
    for _ in range(n):
        task = d.weighted(TASKS, TASK_WEIGHTS)
        town = d.choice(towns)
        instruction = _instruction(d, task, town)
        outputs, nll = [], 0.0
        for k in range(n_references):
            d.reset()
            outputs.append(_response(d, task, town, towns, by_name))
            nll = d.nll if k == 0 else nll
        records.append({"instruction": instruction, "input": "",
                        "output": outputs[0] if n_references == 1 else outputs, "task": task,
                        "nll": round(nll, 6)})
    return records


def write_world_files(folder: str | Path, seed: int, n_towns: int, sizes: dict[str, int],
                      n_references: int = 4) -> dict:
    """Write the world's files into `folder` and return {"files": {name: path}, "sha256": {...}, "world": ...}.

    sizes: teacher_train, student_train (<= teacher_train), dev, test, and optionally pretrain (0 = none).
    Each file has its own seed derived from `seed`, so changing one size leaves the other files as they were.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if sizes["student_train"] > sizes["teacher_train"]:
        raise ValueError("student_train must be <= teacher_train (the students' data is part of the teacher's)")
    towns = build_world(seed, n_towns)
    made = {
        "teacher_train": draw_examples(towns, sizes["teacher_train"], seed * 1000 + 1),
        "dev": draw_examples(towns, sizes["dev"], seed * 1000 + 2),
        "test": draw_examples(towns, sizes["test"], seed * 1000 + 3, n_references=n_references),
    }
    made["student_train"] = made["teacher_train"][:sizes["student_train"]]
    if sizes.get("pretrain"):
        made["pretrain"] = draw_examples(build_world(seed + 7919, n_towns), sizes["pretrain"], seed * 1000 + 4)
    files, digests = {}, {}
    for name, records in made.items():
        path = folder / f"{name}.jsonl"
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
        files[name], digests[name] = str(path), hashlib.sha256(text.encode()).hexdigest()
    world = [{"name": x.name, "region": REGIONS[x.region][0], "size": x.size, "product": x.product,
              "river": x.river, "month": x.month, "neighbours": list(x.neighbours)} for x in towns]
    (folder / "world.json").write_text(json.dumps(world, indent=1) + "\n")
    return {"files": files, "sha256": digests, "n_towns": n_towns, "seed": seed}
