"""cache/paths.py: names that stay inside their folder, links that leave it, the --out checks every stage shares."""
from __future__ import annotations

import pytest

from dskd_pipe.cache.paths import (bad_name, check_out_folder, check_out_location, describe_contents, leaves,
                                   links_leaving)


@pytest.mark.parametrize("name,why", [("tokenizer/vocab.json", None), ("a/./b", None), ("..x", None),
                                      ("../x", "a path through '..'"), ("a/../../x", "a path through '..'"),
                                      ("/etc/passwd", "an absolute path"), ("~/x", "an absolute path"),
                                      ("C:/x", "an absolute path"), ("a\\b", "an absolute path"),
                                      ("", "an empty name"), (None, "an empty name"), ("a\x00b", "a name with a NUL byte")])
def test_bad_name(name, why):
    assert bad_name(name) == why


def test_a_plain_name_has_no_folder():
    assert bad_name("vocab.json", plain=True) is None
    assert bad_name("sub/vocab.json", plain=True) == "a path, not a file name"


def test_links_leaving_a_folder(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (tmp_path / "outside").write_text("x")
    (root / "sub" / "inside").write_text("y")
    (root / "in").symlink_to(root / "sub" / "inside")
    (root / "sub" / "out").symlink_to(tmp_path / "outside")
    (root / "up").symlink_to(tmp_path)
    assert links_leaving(root) == ["sub/out", "up"]
    assert leaves(root, root / "sub" / "out") and not leaves(root, root / "in")


def test_out_checks(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match=r"f/o: .*/f is a file, not a folder\. Pass a path inside a folder\."):
        check_out_location(tmp_path / "f" / "o")
    with pytest.raises(ValueError, match=r"exists and is a file, not a folder"):
        check_out_location(tmp_path / "f")
    with pytest.raises(ValueError, match=r"is a folder, not a file"):
        check_out_location(tmp_path, kind="file")
    folder = tmp_path / "run"
    folder.mkdir()
    assert check_out_folder(folder, lambda f: False, "x") == folder  # empty
    (folder / ".DS_Store").write_text("")
    assert check_out_folder(folder, lambda f: False, "x") == folder  # hidden files are no content
    (folder / "manifest.json").write_text("{}")
    assert describe_contents(folder) == "a teacher-state store (cache-teacher) (.DS_Store, manifest.json)"
    with pytest.raises(ValueError, match=r"holds a teacher-state store .* not an earlier x run"):
        check_out_folder(folder, lambda f: False, "x")
    assert check_out_folder(folder, lambda f: True, "x") == folder
