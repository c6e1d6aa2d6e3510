"""A synthetic instruction domain for the quality benchmark (`dskd-pipe recipe quality`): a small world of towns,
generated deterministically from a seed, and instructions about it whose answers carry real uncertainty.

Why synthetic: on two CPU cores, models small enough to train in minutes learn little of real instruction data
(a d256 x 4 teacher SFT'd on 4,000 Dolly examples reached 6.2 nats/token), so no student could show what a teacher
knows. A narrow domain makes a small teacher strong, and a known generator makes the benchmark honest: every answer
is drawn from a stated distribution, and each record carries the negative log-likelihood of the draw that made it
(`nll`), so the floor any model can reach is known.

The world (`build_world`): `n_towns` towns with made-up names (syllables + a suffix), each with facts (a region, a
size, a main product, a river or none, a festival month, 2-3 neighbours in its region) and its own distributions
(flat-Dirichlet draws): the weather over 6 kinds, 4 starters / mains / desserts out of the cuisine's lists, 5 market
goods out of 16, and where a trip goes next among its neighbours. Instructions (`TASKS`, drawn with
`TASK_WEIGHTS`); phrasings are uniform, the rest as stated:
    describe   "Tell me about T." -> size and region, then 1-3 of its other facts in a random order (3 phrasings each)
    product / river / festival / neighbours    one fact in one of 2-3 phrasings (neighbours in a random order)
    region     "Name a town in R." -> ANY town of region R (uniform)
    buy        "Where can I buy P?" -> ANY town that makes P (uniform)
    forecast   "What will the weather be like in T over the next three days?" -> 3 draws of T's weather
    meal       "Describe a typical meal in T." -> one draw from each of T's three courses
    market     "What can I buy at the market in T?" -> 2 of T's goods (weighted, without replacement)
    trip       "Plan a short trip starting in T." -> 2-3 stops, each next town drawn by the current town's weights,
               its product or one of its mains named
Most of an answer's uncertainty is town-specific: a student that sees each town a few times cannot estimate T's
weather or menu, a teacher that saw 20x more data can, and its soft labels carry them.
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
STARTERS = ("barley soup", "onion pie", "pickled herring", "mushroom broth", "goat cheese", "cabbage rolls",
            "bean salad", "smoked eel")
MAINS = ("mutton stew", "river trout", "roast duck", "salted pork", "pepper sausage", "smoked fish", "bean porridge",
         "lamb pie", "fried carp", "venison")
DESSERTS = ("apple cake", "honey bread", "plum dumplings", "pear tart", "nut bread", "cherry pudding", "sweet buns",
            "baked figs")
GOODS = ("wool", "salt", "copper pots", "apples", "honey", "timber", "glass beads", "cheese", "linen", "silver rings",
         "pottery", "wine", "leather", "candles", "rope", "spices")
TASKS = ("describe", "product", "river", "festival", "neighbours", "region", "buy", "forecast", "meal", "market",
         "trip")
TASK_WEIGHTS = (0.12, 0.04, 0.04, 0.04, 0.04, 0.06, 0.06, 0.16, 0.14, 0.10, 0.20)
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
    neighbour_weights: tuple[float, ...]  # where a trip goes next from here
    weather: tuple[float, ...]  # probabilities over WEATHERS
    menu: tuple[tuple[tuple[str, ...], tuple[float, ...]], ...]  # (dishes, probabilities) per course: 4 of each list
    goods: tuple[tuple[str, ...], tuple[float, ...]]  # 5 market goods and their probabilities


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
        menu = tuple((tuple(draws.permutation(course)[:4]), draws.simplex(4)) for course in (STARTERS, MAINS, DESSERTS))
        goods = (tuple(draws.permutation(GOODS)[:5]), draws.simplex(5))
        towns.append(Town(name, region, size, product, river, month, neighbours, draws.simplex(len(neighbours)),
                          draws.simplex(len(WEATHERS)), menu, goods))
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
    "forecast": ("What will the weather be like in {t} over the next three days?",
                 "Give me the weather forecast for {t}."),
    "meal": ("Describe a typical meal in {t}.", "What would I eat for dinner in {t}?"),
    "market": ("What can I buy at the market in {t}?", "What is sold at the market of {t}?"),
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
    if task == "forecast":
        w1, w2, w3 = (d.weighted(WEATHERS, town.weather, count=True) for _ in range(3))
        return d.choice((f"In {t} it will be {w1} tomorrow, {w2} the day after and {w3} after that.",
                         f"Expect {w1} weather tomorrow, then {w2}, then {w3}."))
    if task == "meal":
        s_, m, e = (d.weighted(dishes, weights, count=True) for dishes, weights in town.menu)
        return d.choice((f"Start with {s_}, then have {m}, and finish with {e}.",
                         f"A meal in {t} begins with {s_}, goes on with {m} and ends with {e}."))
    if task == "market":
        goods, weights = town.goods
        first = d.weighted(goods, weights, count=True)
        rest = [(g, w) for g, w in zip(goods, weights) if g != first]
        second = d.weighted([g for g, _ in rest], [w for _, w in rest], count=True)
        return d.choice((f"At the market in {t} you can buy {first} and {second}.",
                         f"The market of {t} sells {first} and {second}."))
    if task == "trip":
        lines = [f"Start in {t}, {_article(town.size)} {town.size} known for its {town.product}."]
        here, seen = town, {t}
        for _ in range(1 + d.index(2)):
            options = [(n, w) for n, w in zip(here.neighbours, here.neighbour_weights) if n not in seen]
            if not options:
                break
            here = by_name[d.weighted([n for n, _ in options], [w for _, w in options], count=True)]
            seen.add(here.name)
            phrasing = d.index(3)  # the dish is drawn only when the sentence names one
            lines.append(f"Then travel to {here.name}, where you can buy {here.product}." if phrasing == 0 else
                         f"Next, visit {here.name} for its {here.product}." if phrasing == 1 else
                         f"Go on to {here.name} and try the {d.weighted(*here.menu[1], count=True)}.")
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
