"""Conversion faults: kill -9 at random points, a disk that fills up mid-write, and destinations
that must be refused before any work. In each case no folder is left that looks like a finished
model (or loads) unless the conversion really finished, and the source is never touched."""

import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import tokens
from test_convert import convert

from mlx_deepseek import CheckpointError, load_model

ROOT = Path(__file__).resolve().parents[1]


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


def logits(folder):
    return np.array(load_model(folder)(mx.array(tokens(8))))


def command(src, dst):
    # many small shards: the write phase is long enough for kills to land inside it
    return [sys.executable, "-m", "convert", "--hf-path", str(src), "--mlx-path", str(dst), "-q",
            "--q-group-size", "32", "--max-shard-size-gb", "0.0002"]


def partials(out: Path, dst: Path) -> set:
    """The names of the hidden partial folders a conversion to `dst` leaves in `out` while writing."""
    return {p.name for p in out.glob(f".{dst.name}.partial-*")}


def timed_run(src, dst, out):
    """A whole conversion, untouched: (seconds until the partial folder appears, seconds in all)."""
    start, appeared = time.time(), None
    child = subprocess.Popen(command(src, dst), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while child.poll() is None:
        if appeared is None and partials(out, dst):
            appeared = time.time() - start
        time.sleep(0.002)
    assert child.returncode == 0
    return appeared, time.time() - start


def test_kill_9_at_random_points_leaves_nothing_that_looks_finished(checkpoint, tmp_path):
    src = checkpoint("v3", hidden_size=256, intermediate_size=512, moe_intermediate_size=128)
    before = digest(src)
    out = tmp_path / "runs"
    out.mkdir()
    appeared, total = timed_run(src, out / "reference", out)
    expected = logits(out / "reference")
    shutil.rmtree(out / "reference")
    rng = random.Random(16)
    outcomes = []
    for run in range(12):
        dst = out / "model"
        earlier = {p.name for p in out.iterdir()}  # earlier kills' partial folders, until a run clears them
        child = subprocess.Popen(command(src, dst), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if run % 2:  # odd runs: anywhere in the run, start-up included
            time.sleep(rng.uniform(0, total))
        else:  # even runs: while the shards are written, timed from when this run's partial folder appears
            while child.poll() is None and not partials(out, dst) - earlier:
                time.sleep(0.002)
            time.sleep(rng.uniform(0, (total - appeared) / 2))
        child.send_signal(signal.SIGKILL)
        child.wait()
        if dst.exists():  # it had finished: then it is complete and right
            outcomes.append("finished")
            assert np.array_equal(logits(dst), expected)
            shutil.rmtree(dst)
        else:
            leftovers = [p.name for p in out.iterdir()]
            outcomes.append("killed while writing" if set(leftovers) - earlier else "killed")
            assert all(name.startswith(".model.partial-") for name in leftovers), leftovers
            for name in leftovers:  # never mistaken for a model, even when killed just before the rename
                with pytest.raises(CheckpointError, match="an unfinished conversion"):
                    load_model(out / name)
        assert digest(src) == before
    print(f"conversion: partial folder at {appeared:.2f} s, done at {total:.2f} s; kills: {outcomes}")
    assert sum(o.startswith("killed") for o in outcomes) >= 6 and "killed while writing" in outcomes, outcomes
    # a rerun succeeds, gives the same model, and clears the killed runs' partial folders
    assert subprocess.run(command(src, out / "model"), cwd=ROOT, capture_output=True).returncode == 0
    assert [p.name for p in out.iterdir()] == ["model"]
    assert np.array_equal(logits(out / "model"), expected)


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MB tmpfs (as root); skipped where mounting is not permitted."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)],
                                           capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root (mount -t tmpfs); not permitted here")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def test_a_disk_that_fills_up_mid_write(checkpoint, small_disk, monkeypatch, capsys):
    import shutil as sh

    src = checkpoint("v3", hidden_size=128, intermediate_size=256)  # ~2 MB in float32: more than the disk
    before = digest(src)
    # the up-front check passes (as if another program filled the disk while we wrote)
    monkeypatch.setattr(sh, "disk_usage", lambda p: sh._ntuple_diskusage(10**12, 0, 10**12))
    assert convert(src, small_disk / "out") == 1
    err = capsys.readouterr().err
    assert "the disk filled up" in err and "No space left" in err
    assert list(small_disk.iterdir()) == []  # nothing half-written left
    assert digest(src) == before
    monkeypatch.undo()
    assert convert(src, small_disk / "out", "-q", "--q-group-size", "32") == 1  # said up front this time
    assert "GB free" in capsys.readouterr().err


@pytest.mark.parametrize("where,message", [
    (lambda src, tmp: src, "is the source folder"),
    (lambda src, tmp: src / "out", "inside the source folder"),
    (lambda src, tmp: src / "a" / "b", "inside the source folder"),
    (lambda src, tmp: tmp, "contains the source folder"),
])
def test_destinations_around_the_source_are_refused_before_any_work(where, message, checkpoint, tmp_path,
                                                                    capsys, monkeypatch):
    from convert import cli

    src = tmp_path / "src"
    shutil.copytree(checkpoint("v3"), src)
    before = digest(src)
    monkeypatch.setattr(cli, "open_source", lambda *a: pytest.fail("work started"))
    assert convert(src, where(src, tmp_path), "--force") == 1
    assert message in capsys.readouterr().err
    assert digest(src) == before and sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_a_read_only_destination_is_refused_before_any_work(checkpoint, tmp_path, capsys, monkeypatch):
    from convert import cli

    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() == 0:  # root writes through permissions: a read-only mount instead
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], capture_output=True).returncode:
            pytest.skip("a read-only mount needs mount permission")
    else:
        ro.chmod(0o555)
    monkeypatch.setattr(cli, "open_source", lambda *a: pytest.fail("work started"))
    try:
        assert convert(checkpoint("v3"), ro / "out") == 1
        assert "cannot write the output there" in capsys.readouterr().err
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(ro)], check=True)
