"""library_bars_off no longer imports datasets (1.6 s of every stage's start): in a fresh process, datasets stays
unimported through a stage's block, and one imported inside it (a `datasets` data set) arrives silenced and gets its
bars back at the block's end."""
import subprocess
import sys

CODE = """
import sys
from dskd_pipe.pipeline.progress import library_bars_off, silenced_datasets
with library_bars_off():
    assert "datasets" not in sys.modules
with library_bars_off():
    datasets = silenced_datasets()
    assert not datasets.is_progress_bar_enabled()
assert datasets.is_progress_bar_enabled()
assert silenced_datasets().is_progress_bar_enabled()  # outside a block: as it was
print("ok")
"""


def test_datasets_imported_only_when_used_and_silenced_inside_the_block():
    proc = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
