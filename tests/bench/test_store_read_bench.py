"""bench/store_read.py at its smallest: a few examples written as a store and a raw file, every reader timed."""
import json


def test_every_reader_is_timed_on_a_tiny_store(bench, tmp_path):
    out = tmp_path / "store_read.json"
    result = bench("store_read").main(["--gb", "0.003", "--dir", str(tmp_path / "work"), "--chunk-tokens", "32",
                                       "--shard-tokens", "1024", "--out", str(out)])
    assert json.loads(out.read_text()) == result
    assert result["examples"] >= 2 and result["write_mib_s_store"] > 0
    for mode in ("cold", "warm"):
        assert result[f"{mode}_1proc_store_mib_s"] > 0 and result[f"{mode}_2proc_ratio"] > 0
    assert result["warm_1proc_zarr_api_mib_s"] > 0 and not (tmp_path / "work").exists()
