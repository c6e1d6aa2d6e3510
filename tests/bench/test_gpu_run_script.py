"""bench/gpu_run.sh: valid bash, and a part that fails is recorded (FAILED on stderr, in gpu_run-failed.txt, the
script's exit 1), never swallowed; the parts themselves are the benches tested beside this file."""
import re
import subprocess

SCRIPT_PARTS = r"""
set -uo pipefail
res=$1
failed=()
eval "$(sed -n '/^part() {/,/^}/p' bench/gpu_run.sh)"
part good true
part broken bash -c 'exit 3'
part capped bash -c 'exit 124'
echo "${#failed[@]} ${failed[*]}"
"""


def test_script_is_valid_and_no_failure_is_swallowed(bench):
    script = bench.dir / "gpu_run.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert not re.search(r"\|\| echo \"[^\"]*(failed|stopped)", text)
    assert 'exit 1' in text.split("ls -la")[-1]  # the end: any failed part fails the script


def test_part_records_failures(bench, tmp_path):
    proc = subprocess.run(["bash", "-c", SCRIPT_PARTS, "bash", str(tmp_path)], cwd=bench.root, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "2 broken: exit 3 capped: exit 124"
    assert "FAILED: broken (exit 3)" in proc.stderr and "FAILED: capped (exit 124, stopped at its time cap)" in proc.stderr
    assert (tmp_path / "gpu_run-failed.txt").read_text() == "broken: exit 3\ncapped: exit 124\n"
