"""bench/fp8_fidelity.py at its smallest: a tiny store's hidden states through every storage scheme."""
import json

import dskd_pipe as dp
from dskd_pipe.pipeline.models import load_tokenizer, save_tiny_model


def test_every_scheme_is_compared_with_the_exact_rows(bench, tmp_path):
    teacher = save_tiny_model(tmp_path / "teacher", "llama", load_tokenizer(str(bench.tok / "llama2")), d_model=32,
                              layers=1)
    store = dp.cache_teacher(teacher=str(teacher), data=str(bench.data), out=str(tmp_path / "store.zarr"), limit=2,
                             max_length=48, device="cpu", progress=False)
    module = bench("fp8_fidelity")
    out = tmp_path / "fp8.json"
    result = module.main(["--store", str(store), "--rows", "32", "--out", str(out)])
    assert json.loads(out.read_text()) == result
    assert result["examples"] == 2 and set(result["schemes"]) == set(module.SCHEMES)
    for scheme, row in result["schemes"].items():
        assert 0.0 <= row["top1_agreement"] <= 1.0 and row["kl_tau1"]["mean"] >= 0.0, scheme
