"""Every script in bench/ has its smoke test here, and reaches the product only through public names (a private
helper a benchmark needs is given a public name in its module, e.g. `stages.cache_teacher.cache_batches`)."""
import ast

HELPERS = {"results_file"}  # imported by the benches, not a benchmark
TEST_OF = {"distill_offline_vs_online": "test_offline_vs_online_bench"}  # named before this rule


def test_every_bench_script_has_a_test(bench):
    tests = {p.stem for p in (bench.root / "tests" / "bench").glob("test_*.py")}
    missing = [p.name for p in sorted(bench.dir.glob("*.py")) if p.stem not in HELPERS
               and TEST_OF.get(p.stem) not in tests
               and not any(t == f"test_{p.stem}" or t.startswith(f"test_{p.stem}_") for t in tests)]
    assert not missing, f"bench scripts without a tests/bench/test_<name>_bench.py: {missing}"


def test_no_bench_uses_a_private_product_name(bench):
    found = []
    for path in sorted(bench.dir.glob("*.py")):
        tree = ast.parse(path.read_text())
        product = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                   and (n.module or "").startswith("dskd_pipe") for a in n.names}
        product |= {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.Import)
                    for a in n.names if a.name.startswith("dskd_pipe")}
        for n in ast.walk(tree):
            if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("dskd_pipe"):
                found += [f"{path.name}:{n.lineno}: {a.name}" for a in n.names if a.name.startswith("_")]
            elif (isinstance(n, ast.Attribute) and n.attr.startswith("_") and not n.attr.startswith("__")
                  and isinstance(n.value, ast.Name) and n.value.id in product):
                found.append(f"{path.name}:{n.lineno}: {n.value.id}.{n.attr}")
    assert not found, found
