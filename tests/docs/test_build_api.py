"""docs/build_api.py: the API reference builds with pdoc from the docstrings, and documents every public name (with
its docstring) and no implementation module."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import dskd_pipe
import dskd_pipe.losses

ROOT = Path(__file__).resolve().parents[2]


def _build(out: Path) -> list[Path]:
    spec = importlib.util.spec_from_file_location("build_api", ROOT / "docs" / "build_api.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build(out)


def test_the_reference_documents_the_public_surface_and_nothing_else(tmp_path):
    files = _build(tmp_path)
    names = sorted(p.relative_to(tmp_path).as_posix() for p in files)
    assert names == ["dskd_pipe.html", "dskd_pipe/losses.html", "index.html"]
    top, losses = (tmp_path / "dskd_pipe.html").read_text(), (tmp_path / "dskd_pipe" / "losses.html").read_text()
    for name in dskd_pipe.__all__:
        if name != "losses":
            assert f'id="{name}"' in top, name
    for name in dskd_pipe.losses.__all__:
        assert f'id="{name}"' in losses, name
    assert "dskd_pipe.pipeline" not in re.findall(r'href="([^"]+)"', top)  # no page of an implementation module
    assert "Open a finished teacher-state store" in top and "KL(P || Q) summed over supervised positions" in losses
    assert "Where the store is: a folder or an fsspec URL." in top  # attribute docstrings too
    for page in (top, losses):
        assert "/work/" not in page and "/tmp/" not in page  # nothing of the machine that built it
