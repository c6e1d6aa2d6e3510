"""kill -9 at random moments and any shard split: the store's bytes do not change (issue 14).

Slow (behind the `slow` marker); CI runs them on 20 examples and 3 kills, DSKD_PIPE_FULL_TRIALS=1 on 40 and 5. bench/chaos.py runs the
same trial N times and reports the figure in BENCHMARKS.md.
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest

from reliability_helpers import DSKD, FULL, cache_args, differing_files, example_bytes

pytestmark = pytest.mark.slow
LIMIT = 40 if FULL else 20
KILLS = 5 if FULL else 3
# Each shard write sleeps this long in these trials, so that random kill moments land while rows are written
# (a tiny teacher computes its whole store in well under a second, after ~4 s of imports).
SLOW_WRITES = {"DSKD_PIPE_TEST_WRITE_DELAY_S": "0.15"}


def _run(args, env=None, timeout=300):
    p = subprocess.run([DSKD, *map(str, args)], env={**os.environ, **(env or {})}, capture_output=True, text=True,
                       timeout=timeout)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return p


@pytest.fixture(scope="module")
def clean(models, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean") / "t.zarr"
    t0 = time.monotonic()
    _run(cache_args(models["teacher"], out, "--topk", "2", limit=LIMIT), SLOW_WRITES)
    return out, time.monotonic() - t0


def test_kills_at_random_moments_give_the_same_bytes(models, clean, tmp_path):
    """KILLS x SIGKILL at moments drawn over a whole run's length (imports, creation, head, rows, finalize), each time the
    same command again; then one more run to finish. Every file equals the uninterrupted run's, byte for byte."""
    reference, seconds = clean
    out = tmp_path / "t.zarr"
    rng = random.Random(14)
    moments = []
    for _ in range(KILLS):
        p = subprocess.Popen([DSKD, *map(str, cache_args(models["teacher"], out, "--topk", "2", limit=LIMIT))],
                             env={**os.environ, **SLOW_WRITES}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        moment = rng.uniform(0.2, 0.75) * seconds
        try:
            p.wait(timeout=moment)
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGKILL)
            p.wait()
        moments.append((round(moment, 2), p.returncode))
    assert sum(rc == -signal.SIGKILL for _, rc in moments) > KILLS // 2, moments  # most runs were really killed
    _run(cache_args(models["teacher"], out, "--topk", "2", limit=LIMIT))
    assert differing_files(out, reference) == [], moments


def test_two_shards_and_two_torchrun_ranks_equal_one_process(models, clean, tmp_path):
    """--shard 0/2 + 1/2 and `torchrun --nproc-per-node 2` write different parts but every example's bytes equal
    one process's: each example is computed in its planned batch, whichever process computes it."""
    reference, _ = clean
    want = example_bytes(reference)
    shards = tmp_path / "shards.zarr"
    procs = [subprocess.Popen([DSKD, *map(str, cache_args(models["teacher"], shards, "--topk", "2", "--shard",
                                                        f"{i}/2", limit=LIMIT))],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    from dskd_pipe.cache.reader import open_store
    split = open_store(str(shards))
    assert split.manifest.n_parts == 2 and {split.locate(i)[0] for i in range(LIMIT)} == {0, 1}  # both wrote
    assert example_bytes(shards) == want
    ranks = tmp_path / "ranks.zarr"
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "--no-python", DSKD, *map(str, cache_args(models["teacher"], ranks, "--topk", "2",
                                                                  limit=LIMIT))],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert open_store(str(ranks)).manifest.n_parts == 2
    assert example_bytes(ranks) == want
