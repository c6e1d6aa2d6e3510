"""Build the API reference of the public surface (`dskd_pipe` and `dskd_pipe.losses`) from its docstrings, with
pdoc (in the test extra): `python docs/build_api.py [OUT]` writes OUT (default docs/api/, not committed: it is
built from the code in seconds); open OUT/index.html. tests/docs/test_build_api.py builds it on every test run.
"""
from __future__ import annotations

import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "api"


def build(out: Path = OUT) -> list[Path]:
    """Write the reference into `out` (replacing its pages); return the files written."""
    import pdoc
    import pdoc.render

    import dskd_pipe

    for name in dskd_pipe.__all__:  # the names load on first use: make them plain attributes pdoc can see
        getattr(dskd_pipe, name)
    # No source listings (they would repeat the implementation modules the reference leaves out), no search index
    # (a large generated file), no date: the same code gives the same pages.
    pdoc.render.configure(docformat="markdown", show_source=False, search=False,
                          footer_text=f"dskd-pipe {dskd_pipe.__version__}")
    out.mkdir(parents=True, exist_ok=True)
    for old in out.rglob("*.html"):
        old.unlink()
    pdoc.pdoc("dskd_pipe", output_directory=out)
    return sorted(out.rglob("*.html"))


if __name__ == "__main__":
    for path in build(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT):
        print(path)
