"""pipeline/world.py: the quality benchmark's synthetic world is deterministic, its answers follow the stated
distributions, each record's `nll` is the NLL of the draw that wrote it, and the files split as documented."""
from __future__ import annotations

import json
import math
import re
from collections import Counter

import pytest

from dskd_pipe.pipeline import world


def test_world_has_every_region_product_and_distinct_names():
    towns = world.build_world(3, 30)
    assert len({t.name for t in towns}) == 30
    assert {t.region for t in towns} == set(range(len(world.REGIONS)))
    assert {t.product for t in towns} == set(world.PRODUCTS)
    for t in towns:
        assert 2 <= len(t.neighbours) <= 3 and t.name not in t.neighbours
        assert all(n in {x.name for x in towns if x.region == t.region} for n in t.neighbours)
        assert len(t.neighbour_weights) == len(t.neighbours)
        for dist in (t.weather, t.neighbour_weights, *(w for _, w in t.menu), t.goods[1]):
            assert sum(dist) == pytest.approx(1.0) and min(dist) > 0
        for (dishes, weights), course in zip(t.menu, (world.STARTERS, world.MAINS, world.DESSERTS)):
            assert len(set(dishes)) == len(weights) == 4 and set(dishes) <= set(course)
        assert len(set(t.goods[0])) == 5 and set(t.goods[0]) <= set(world.GOODS)
    assert world.build_world(3, 30) == towns
    assert world.build_world(4, 30) != towns
    with pytest.raises(ValueError, match="n_towns must be >= 12"):
        world.build_world(0, 5)


def test_nll_is_the_negative_log_probability_of_the_draw():
    towns = world.build_world(1, 24)
    by_name = {t.name: t for t in towns}
    records = world.draw_examples(towns, 400, seed=7)
    for r in records:
        town = next(t for t in towns if t.name in r["instruction"]) if r["task"] not in ("region", "buy") else None
        if r["task"] in ("product", "festival"):
            assert r["nll"] == pytest.approx(math.log(3))  # one of three phrasings
        elif r["task"] == "forecast":  # three independent draws of the town's weather, one of two phrasings
            days = re.findall(r"\b(" + "|".join(world.WEATHERS) + r")\b", r["output"].replace(town.name, ""))
            assert len(days) == 3
            nll = math.log(2) - sum(math.log(town.weather[world.WEATHERS.index(w)]) for w in days)
            assert r["nll"] == pytest.approx(nll, abs=1e-5)
        elif r["task"] == "meal":  # one draw per course
            nll = math.log(2)
            for dishes, weights in town.menu:
                eaten = [i for i, d in enumerate(dishes) if d in r["output"]]
                assert len(eaten) == 1
                nll -= math.log(weights[eaten[0]])
            assert r["nll"] == pytest.approx(nll, abs=1e-5)
        elif r["task"] == "market":  # two goods without replacement, in the order drawn
            text = r["output"].replace(town.name, "")
            goods, weights = town.goods
            first, second = sorted((i for i, g in enumerate(goods) if g in text), key=lambda i: text.index(goods[i]))
            nll = math.log(2) - math.log(weights[first]) - math.log(weights[second] / (1 - weights[first]))
            assert r["nll"] == pytest.approx(nll, abs=1e-5)
        elif r["task"] == "buy":
            product = r["instruction"].split(" buy ")[-1].rstrip("?") if " buy " in r["instruction"] else \
                r["instruction"].split(" for ")[-1].rstrip("?")
            sellers = [t for t in towns if t.product == product]
            assert any(t.name in r["output"] for t in sellers)
            assert r["nll"] == pytest.approx(math.log(len(sellers)) + math.log(2), abs=1e-5)
    assert {r["task"] for r in records} == set(world.TASKS)
    assert by_name  # every town is reachable by name


def test_task_frequencies_follow_their_weights():
    records = world.draw_examples(world.build_world(1, 24), 6000, seed=2)
    counts = Counter(r["task"] for r in records)
    for task, weight in zip(world.TASKS, world.TASK_WEIGHTS):
        assert counts[task] / 6000 == pytest.approx(weight, abs=0.02), task


def test_files_are_deterministic_and_split_as_documented(tmp_path):
    sizes = {"teacher_train": 60, "student_train": 20, "dev": 10, "test": 8, "pretrain": 12}
    a = world.write_world_files(tmp_path / "a", seed=5, n_towns=12, sizes=sizes, n_references=3)
    b = world.write_world_files(tmp_path / "b", seed=5, n_towns=12, sizes=sizes, n_references=3)
    assert a["sha256"] == b["sha256"]
    read = {k: [json.loads(line) for line in open(p)] for k, p in a["files"].items()}
    assert {k: len(v) for k, v in read.items()} == sizes
    assert read["student_train"] == read["teacher_train"][:20]
    assert all(isinstance(r["output"], list) and len(r["output"]) == 3 for r in read["test"])
    assert all(isinstance(r["output"], str) for r in read["dev"])
    # The pretraining text is about another world: none of this world's town names.
    names = {t["name"] for t in json.loads((tmp_path / "a" / "world.json").read_text())}
    assert not any(n in r["instruction"] + r["output"] for r in read["pretrain"] for n in names)
    with pytest.raises(ValueError, match="student_train must be <= teacher_train"):
        world.write_world_files(tmp_path / "c", seed=5, n_towns=12, sizes={**sizes, "student_train": 61})
