"""Errors a user can fix, shared by modules that cannot import each other (pipeline/models.py uses pipeline/gguf.py,
and both report unusable models). Each message names the thing and the fix; the CLI prints it as one line."""
from __future__ import annotations


class ModelError(ValueError):
    """A model or tokenizer cannot be used as asked; the message names it and the fix."""
