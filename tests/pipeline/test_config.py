import json

import pytest

from dskd_pipe.pipeline.config import CacheConfig, ConfigError, ScoreConfig, load_config, save_config


def test_file_then_flags(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('teacher = "t"\ntopk = 5\nlimit = 10\n')
    cfg = load_config(CacheConfig, f, {"topk": 7, "limit": None})
    assert (cfg.teacher, cfg.topk, cfg.limit) == ("t", 7, 10)


def test_all_problems_reported_together_with_file_and_key(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('teacher = "t"\nbatch_token = 5\ntopk = "many"\n')
    with pytest.raises(ConfigError) as e:
        load_config(CacheConfig, f, {"skip_bad": "perhaps"})
    msg = str(e.value)
    assert f"{f}: unknown key 'batch_token' for CacheConfig" in msg
    assert f"{f}: key 'topk': expected an integer, found 'many'." in msg
    assert "command line: key 'skip_bad': expected true/false, found 'perhaps'." in msg


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(ScoreConfig, None, {"models": ["m1", "m2"], "seeds": [1, 2], "limit": 3})
    save_config(cfg, tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text())["stage"] == "ScoreConfig"
    assert load_config(ScoreConfig, tmp_path / "r.json") == cfg


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(CacheConfig, tmp_path / "none.toml")
    (tmp_path / "b.toml").write_text("x = [")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(CacheConfig, tmp_path / "b.toml")


@pytest.mark.parametrize("value", [0, -1])
def test_limit_below_one_is_refused_by_name(tmp_path, value):
    """Issue 14: --limit 0 / -1 used to fail later as "no usable records"."""
    with pytest.raises(ConfigError, match=rf"command line: --limit must be >= 1, found {value} "):
        load_config(CacheConfig, None, {"limit": value})
    (tmp_path / "c.toml").write_text(f"dev_limit = {value}\n")
    from dskd_pipe.pipeline.config import DistillConfig

    with pytest.raises(ConfigError, match=rf"c.toml: --dev-limit must be >= 1, found {value} "):
        load_config(DistillConfig, tmp_path / "c.toml")
    assert load_config(CacheConfig, None, {"limit": 1}).limit == 1
