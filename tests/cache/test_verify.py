"""cache-verify reads every chunk: a flipped byte is reported with its array, chunk and example ids."""
from click.testing import CliRunner

from dskd_pipe.pipeline.cli import main


def test_flipped_byte_is_reported(tiny_teacher_dirs, cache_cli, dolly40, tmp_path):
    out = tmp_path / "t.zarr"
    assert cache_cli("--teacher", tiny_teacher_dirs["gpt2"], "--data", dolly40, "--out", out, "--limit", 8,
                     "--chunk-tokens", 16, "--device", "cpu").exit_code == 0
    ok = CliRunner().invoke(main, ["cache-verify", str(out)])
    assert ok.exit_code == 0 and "ok (" in ok.output
    chunk = out / "parts" / "part-00000" / "hidden" / "c" / "2" / "0"
    data = bytearray(chunk.read_bytes())
    data[100] ^= 0x10
    chunk.write_bytes(bytes(data))
    bad = CliRunner().invoke(main, ["cache-verify", str(out)])
    assert bad.exit_code == 1
    assert "parts/part-00000/hidden chunk 2 (rows 32..48), example ids [" in bad.output
    info = CliRunner().invoke(main, ["cache-info", str(out)])
    assert info.exit_code == 0 and '"bytes_per_token"' in info.output
