"""bench/chaos.py at its smallest: the cache-teacher reference run through the installed `dskd-pipe` command, and
its store compared with itself (no loss, no duplicate, every byte identical); kills are left to the bench itself
(each costs whole runs of the command)."""
import json


def test_reference_run_and_store_comparison(bench, tmp_path):
    module = bench("chaos")
    out = tmp_path / "chaos.json"
    results = module.main(["--kills", "0", "--stages", "cache-teacher", "--limit", "4", "--work", str(tmp_path / "w"),
                           "--out", str(out)])
    assert json.loads(out.read_text()) == results
    stage = results["stages"]["cache-teacher"]
    assert stage["kills"] == stage["trials"] == 0 and stage["reference_seconds"] > 0
    assert stage["summary"] == "0 kills, 0 lost, 0 duplicated, bytes identical"
    ref = tmp_path / "w" / "cache-teacher-reference"
    assert module.compare_stores(ref, ref) == {"lost": 0, "duplicated": 0, "identical": True, "differing_files": []}
