"""`dskd-pipe demo`: the quality benchmark (configs/quality.toml) at its `demo` size, a few minutes on a CPU.

A teacher trained here on a synthetic world's instructions (pipeline/world.py) with a byte-level BPE tokenizer, its
hidden states cached, student bases pretrained on another world's text, students with a WordPiece tokenizer
distilled from the store (sft and alm+prefix-kd), a student with the teacher's tokenizer distilled with plain KD (the
same-tokenizer positive control, beside its own sft), three training seeds each, all scored on held-out data:
NLL of gold answers per character and ROUGE-L of sampled answers, with each method's paired difference to sft.
Sizes: `demo` (the default) and `ci` (the test's seconds-long run). The layout of `--out DIR` and the reuse of
finished work on a rerun are the recipe's (stages/recipe.py).
"""
from __future__ import annotations

from pathlib import Path

from dskd_pipe.stages import recipe
from dskd_pipe.stages.recipe import shipped

SIZES = ("demo", "ci")
CONFIG = "quality.toml"


def load_demo_config(size: str, path: str | Path | None = None) -> dict:
    """The resolved settings of one size of configs/quality.toml (or of `path`); problems reported together."""
    return recipe.load_recipe_config(path or shipped(CONFIG), size)[1]


def run(out: str | Path, size: str = "demo", config: str | Path | None = None, fresh: bool = False,
        progress: bool = True, quiet: bool = False) -> dict:
    """configs/quality.toml (or `config`) at `size` through the recipe runner; see recipe.run."""
    return recipe.run(config or shipped(CONFIG), size=size, out=out, fresh=fresh, progress=progress, quiet=quiet)


__all__ = ["run", "load_demo_config", "SIZES", "shipped"]
