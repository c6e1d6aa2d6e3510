"""Paths that files name, and the folders a stage writes into.

A store's manifest and groups, a checkpoint's metadata and a recipe config name other files relative to their own
folder. A crafted name ('../../x', '/etc/x') or a link inside the folder that points out of it would make a reader
read, or a stage write, outside that folder: `bad_name` and `links_leaving` find them, and every reader of such a
name refuses it (cache-verify lists them).

An output folder (`--out`) is checked before anything is loaded, the same way by every stage: its parent exists as a
folder and is writable (`check_out_location`); a folder that already holds files this stage did not make is refused
by the stage, naming what it holds (`describe_contents`).
"""
from __future__ import annotations

import os
from pathlib import Path


def bad_name(name, plain: bool = False) -> str | None:
    """Why `name`, a path some file gives relative to its own folder, could lead out of that folder (or is no path
    at all); None when it stays inside. `plain`: a single file name, no folders."""
    if not isinstance(name, str) or not name.strip():
        return "an empty name"
    if "\x00" in name:
        return "a name with a NUL byte"
    if name.startswith(("/", "~")) or "\\" in name or (len(name) > 1 and name[1] == ":"):
        return "an absolute path"
    parts = name.split("/")
    if ".." in parts:
        return "a path through '..'"
    if plain and (len(parts) > 1 or name in (".", "")):
        return "a path, not a file name"
    return None


def leaves(root: str | Path, path: str | Path) -> bool:
    """Whether local `path` resolves (links followed) outside the local folder `root`."""
    base = os.path.realpath(root)
    real = os.path.realpath(path)
    return real != base and not real.startswith(base.rstrip(os.sep) + os.sep)


def links_leaving(root: str | Path) -> list[str]:
    """Links under the local folder `root` that resolve outside it (relative names, sorted). Links are not followed
    into folders, so a link to '/' is reported once rather than walked."""
    root = Path(root)
    found = []
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(folder) / name
            if p.is_symlink() and leaves(root, p):
                found.append(p.relative_to(root).as_posix())
    return sorted(found)


def check_out_location(out: str | Path, error: type[Exception] = ValueError, kind: str = "folder") -> Path:
    """`out` (a local folder, or a file when kind="file") checked before a stage loads anything: not the other kind
    of thing, inside a folder (not under a file), writable. Raises `error` naming the path and the fix."""
    path = Path(out).expanduser()
    if kind == "folder" and path.exists() and not path.is_dir():
        raise error(f"--out {out}: exists and is a file, not a folder. Pass a new folder.")
    if kind == "file" and path.is_dir():
        raise error(f"--out {out}: is a folder, not a file. Pass a file name.")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise error(f"--out {out}: {parent} is a file, not a folder. Pass a path inside a folder.")
    target = path if path.exists() else parent
    if not os.access(target, os.W_OK | os.X_OK if target.is_dir() else os.W_OK):
        raise error(f"--out {out}: {target} is not writable. Pass a folder you can write to.")
    return path


def check_out_folder(out: str | Path, is_own, stage: str, error: type[Exception] = ValueError) -> Path:
    """The --out folder of `stage`, checked before anything is loaded: writable (check_out_location), and new,
    empty, or the stage's own earlier output (`is_own(folder)`; the stage's resume and re-run rules take it from
    there). A folder holding anything else (a teacher store, a model, another stage's outputs) is refused with
    `error`, naming what it holds: the stage would write over it."""
    folder = check_out_location(out, error)
    if folder.is_dir() and visible_entries(folder) and not is_own(folder):
        raise error(f"--out {folder} holds {describe_contents(folder)}, not an earlier {stage} run: the run would "
                    "write over it. Pass a new or empty folder as --out.")
    return folder


# What a folder holds, recognised by the files that mark it: (file, description), the first match wins.
_KINDS = (("manifest.json", "a teacher-state store (cache-teacher)"),
          ("manifest.partial.json", "an unfinished teacher-state store (cache-teacher)"),
          ("distill_config.json", "a distill run"),
          ("report.json", "a score run"),
          ("recipe.json", "a recipe run"),
          ("model.safetensors", "a model"),
          ("model.safetensors.index.json", "a model"),
          ("pytorch_model.bin", "a model"),
          ("config.json", "a model or run config"))


def describe_contents(folder: str | Path, limit: int = 4) -> str:
    """What `folder` holds, for an error message: its kind when a marker file says it, and its first entries."""
    names = sorted(p.name for p in Path(folder).iterdir())
    kind = next((what for marker, what in _KINDS if marker in names), None)
    shown = ", ".join(names[:limit]) + (f", ... ({len(names)} entries)" if len(names) > limit else "")
    return f"{kind} ({shown})" if kind else f"{len(names)} entr{'y' if len(names) == 1 else 'ies'} ({shown})"


def visible_entries(folder: str | Path) -> list[str]:
    """The entries of an existing folder that count as content (hidden files such as .DS_Store do not)."""
    return sorted(p.name for p in Path(folder).iterdir() if not p.name.startswith("."))
