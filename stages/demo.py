"""`dskd-pipe demo`: the whole job on what ships with the package, in a few minutes on a CPU.

The demo is configs/demo.toml run by the recipe runner (stages/recipe.py), which also runs real experiments:
a tiny Qwen2-architecture teacher (real Qwen tokenizer) SFT'd on the shipped Dolly train slice, cached, distilled
into a tiny GPT-2 student (real GPT-2 tokenizer) with sft and cma-ga, all scored on the Dolly test slice. Sizes:
`small` (the default, a few minutes) and `tiny` (the test). The layout of `--out DIR` and the reuse of finished work
on a rerun are the recipe's (see stages/recipe.py).
"""
from __future__ import annotations

from pathlib import Path

from dskd_pipe.stages import recipe
from dskd_pipe.stages.recipe import shipped

SIZES = ("small", "tiny")
CONFIG = "demo.toml"


def load_demo_config(size: str, path: str | Path | None = None) -> dict:
    """The resolved settings of one size of configs/demo.toml (or of `path`); problems reported together."""
    return recipe.load_recipe_config(path or shipped(CONFIG), size)[1]


def run(out: str | Path, size: str = "small", config: str | Path | None = None, fresh: bool = False,
        progress: bool = True) -> dict:
    """configs/demo.toml (or `config`) at `size` through the recipe runner; see recipe.run."""
    return recipe.run(config or shipped(CONFIG), size=size, out=out, fresh=fresh, progress=progress)


__all__ = ["run", "load_demo_config", "SIZES", "shipped"]
