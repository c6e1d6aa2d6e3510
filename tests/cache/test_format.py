import pytest

from dskd_pipe.cache.format import FORMAT_VERSION, Manifest, StoreError, check_compatible


def _manifest(**kw):
    fp = {"teacher": {"name": "t", "architecture": "A", "config_sha256": "c" * 64},
          "tokenizer": "t" * 64,
          "data": {"path": "train.jsonl", "sha256": "9c1e" + "0" * 60, "limit": None, "skip_bad": False,
                   "n_examples": 40},
          "template": "alpaca-v1", "lengths": {"max_prompt_length": 256, "max_length": 512}}
    return Manifest(fingerprints=fp, hidden_dtype="bfloat16", d_model=8, vocab_size=10, eos_id=1, pad_id=1, **kw)


def test_manifest_round_trip():
    m = _manifest(topk=4)
    d = m.to_dict()
    assert d["storage_dtype"] == "uint16" and d["format_version"] == FORMAT_VERSION
    assert Manifest.from_dict(d) == m


def test_other_version_refused():
    d = _manifest().to_dict()
    d["format_version"] = 99
    with pytest.raises(StoreError, match="format version 99"):
        Manifest.from_dict(d)


def test_other_data_named():
    m = _manifest()
    with pytest.raises(StoreError) as e:
        check_compatible(m, {"data": {"path": "dev.jsonl", "sha256": "ab12" + "1" * 60}}, store="teacher.zarr")
    assert str(e.value) == ("teacher.zarr was built from train.jsonl (sha256 9c1e00000000...), not dev.jsonl "
                            "(sha256 ab1211111111...). Pass the same --data or build a new store.")


def test_other_teacher_and_template_named():
    m = _manifest()
    with pytest.raises(StoreError, match="built from teacher t .*Pass the same --teacher"):
        check_compatible(m, {"teacher": {"name": "u", "architecture": "A", "config_sha256": "d" * 64}})
    with pytest.raises(StoreError, match="template"):
        check_compatible(m, {"template": "other"})
    check_compatible(m, {"template": "alpaca-v1", "data": dict(m.fingerprints["data"])})
