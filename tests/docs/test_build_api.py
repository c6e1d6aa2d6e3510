"""docs/build_api.py: the API reference builds with pdoc from the docstrings, documents every public name and no
implementation module, and equals the committed docs/api (the README links it), so it never goes stale unseen."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import dskd_pipe
import dskd_pipe.losses

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "docs" / "api"


def _build(out: Path) -> list[Path]:
    spec = importlib.util.spec_from_file_location("build_api", ROOT / "docs" / "build_api.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build(out)


def test_the_reference_documents_the_public_surface_and_equals_the_committed_one(tmp_path):
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
    stale = [p.relative_to(tmp_path).as_posix() for p in files
             if not (COMMITTED / p.relative_to(tmp_path)).is_file()
             or (COMMITTED / p.relative_to(tmp_path)).read_bytes() != p.read_bytes()]
    assert sorted(p.relative_to(COMMITTED).as_posix() for p in COMMITTED.rglob("*.html")) == names
    assert not stale, f"docs/api is out of date ({', '.join(stale)}): run `python docs/build_api.py` and commit it."
