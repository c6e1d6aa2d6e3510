"""`dskd-pipe`: parses flags into a stage config and calls the stage's `run`. Flags override the config file."""
from __future__ import annotations

import sys

import click

from dskd_pipe.pipeline.config import ConfigError


class _Group(click.Group):
    """Turns the project's user errors (bad data, config, store, model) into one clear line and exit code 2."""

    def invoke(self, ctx):
        from dskd_pipe.pipeline.data import DataError
        from dskd_pipe.pipeline.models import ModelError

        user_errors: tuple[type[BaseException], ...] = (ConfigError, DataError, ModelError)
        try:
            from dskd_pipe.cache.format import StoreError

            user_errors += (StoreError,)
        except ImportError:
            pass
        try:
            return super().invoke(ctx)
        except user_errors as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)


@click.group(cls=_Group)
def main() -> None:
    """dskd-pipe: distil a teacher LLM into a student with any tokenizer, from a cached teacher-state store."""


# --- cache-teacher, cache-info, cache-verify (stages/cache_teacher.py, cache/) ---

# --- distill (stages/distill.py) ---

# --- score, generate (stages/score.py) ---
