"""bench/object_store_read.py at its smallest: one example written and read through moto's S3 server and from disk."""
import json


def test_s3_and_local_reads_are_timed(bench, tmp_path, monkeypatch):
    # the script points the process's S3 settings at its server: undone after the test
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL"):
        monkeypatch.setenv(key, "")
    out = tmp_path / "object_store_read.json"
    try:
        result = bench("object_store_read").main(["--mib", "0.5", "--repeats", "1", "--dir", str(tmp_path),
                                                  "--out", str(out)])
    finally:
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()  # the next user of s3:// gets a client of its own settings
    assert json.loads(out.read_text()) == result
    assert result["endpoint"] == "moto_server on loopback" and result["examples"] >= 1
    assert result["read_mib_s"]["s3"] > 0 and result["read_mib_s"]["local"] > 0
