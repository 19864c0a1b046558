"""Crash safety of training: checkpoint rotation, resuming past truncated / corrupt / missing
checkpoints, non-finite steps, SIGINT, and SIGKILL mid-run followed by --resume.

Every run here is the m2f_tiny preset on four 64 px synthetic images, one thread."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from proscale.checkpoints.io import safe_load  # noqa: E402
from proscale.engine import checkpointer as ck  # noqa: E402
from proscale.engine.train import NonFiniteLossError, TrainConfig, split_overrides, train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
N = 8
# As tests/test_resume.py: augmentation, flips, epochs of 2 iterations and an lr step, so that a
# resumed run matches only when data order, RNG, optimizer and schedule are all restored.
OVERRIDES = [f"iterations={N}", "batch_size=2", "log_period=1", "eval_period=0",
             "data.augmentation=resize", "data.min_size_train=48,56,64", "data.max_size_train=64",
             "data.flip=true", "data.num_workers=0", "loss.num_points=512", "solver.schedule=step",
             "solver.steps=3,6", "solver.lr=1e-4", "seed=11"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
RESUMED = re.compile(r"resumed from (\S+) at iteration (\d+)")


def make_cfg(root: str, out: Path, *extra: str) -> TrainConfig:
    """The config `proscale train --preset m2f_tiny ... OVERRIDES` runs: the preset's recipe + OVERRIDES."""
    from proscale.recipes import recipe_config

    cfg = recipe_config(None, "m2f_tiny")
    cfg.output_dir, cfg.progress = str(out), False
    cfg.data.train = (f"synthetic:{root}",)
    return split_overrides(cfg, OVERRIDES + list(extra))


def cli(root: str, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "proscale", "train", "--preset", "m2f_tiny", "--data", f"synthetic:{root}",
            "--out", str(out), *OVERRIDES, "progress=false", *extra]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    from proscale.data import generate_synthetic

    return generate_synthetic(str(tmp_path_factory.mktemp("synth") / "s"), num_train=4, num_val=1,
                              image_size=64, seed=5)


@pytest.fixture(scope="module")
def reference(data_root, tmp_path_factory):
    """An uninterrupted N-iteration run that keeps a checkpoint of every iteration: (folder,
    final checkpoint). Checkpointing does not touch the RNG, so the weights are those of any
    other checkpoint_period."""
    out = tmp_path_factory.mktemp("ref") / "run"
    result = train(make_cfg(data_root, out, "checkpoint_period=1", "keep_last=0"))
    assert result["status"] == "completed" and result["iteration"] == N and result["nonfinite_steps"] == 0
    return out, safe_load(out / "model_final.pt")


def assert_same_weights(a: dict, b: dict, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].numel())
    assert worst <= atol, f"max weight difference {worst:.3g}"


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def iterations_logged(out: Path) -> list[int]:
    return [json.loads(line)["iteration"] for line in open(out / "metrics.jsonl") if '"loss"' in line]


def periodic(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob("model_0*.pt"))


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def seed_checkpoint_folder(reference, dest: Path, upto: int) -> Path:
    """A copy of the reference run as it was after checkpoint `upto` (last_checkpoint names it)."""
    src, _ = reference
    dest.mkdir(parents=True)
    for i in range(1, upto + 1):
        shutil.copy2(src / ck.checkpoint_name(i), dest / ck.checkpoint_name(i))
    lines = [line for line in (src / "metrics.jsonl").read_text().splitlines() if json.loads(line)["iteration"] <= upto]
    (dest / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))
    ck.write_last(dest, ck.checkpoint_name(upto))
    return dest


# ------------------------------------------------------------------------------ the checkpointer
def touch(path: Path, t: float) -> Path:
    path.write_bytes(b"x")
    os.utime(path, (t, t))
    return path


def test_prune_keeps_last_k_and_never_the_pointed_one(tmp_path):
    t0 = time.time() - 100
    for i in range(1, 6):
        touch(tmp_path / ck.checkpoint_name(i), t0 + i)
    touch(tmp_path / "model_final.pt", t0 + 6)
    ck.write_last(tmp_path, ck.checkpoint_name(5))
    assert ck.prune(tmp_path, 0) == [] and len(periodic(tmp_path)) == 5  # 0 keeps all
    ck.prune(tmp_path, 2)
    assert periodic(tmp_path) == ["model_0000004.pt", "model_0000005.pt"]
    assert (tmp_path / "model_final.pt").is_file()
    # A run resumed from an older checkpoint (last_checkpoint names 2; 4 and 5 are from a future
    # it lost): counting stops at 2, the newer files stay until the run overwrites them.
    for i in (1, 2, 3):
        touch(tmp_path / ck.checkpoint_name(i), t0 + i)
    ck.write_last(tmp_path, ck.checkpoint_name(2))
    ck.prune(tmp_path, 1)
    assert periodic(tmp_path) == ["model_0000002.pt", "model_0000003.pt", "model_0000004.pt", "model_0000005.pt"]
    # keep_last=1 with last_checkpoint naming an older file than the newest: it is kept anyway.
    ck.write_last(tmp_path, ck.checkpoint_name(4))
    ck.prune(tmp_path, 1)
    assert periodic(tmp_path) == ["model_0000004.pt", "model_0000005.pt"]
    # Without a last_checkpoint: the newest K.
    (tmp_path / ck.LAST).unlink()
    ck.prune(tmp_path, 1)
    assert periodic(tmp_path) == ["model_0000005.pt"]
    assert not list(tmp_path.glob(".*.tmp"))


def test_resume_candidates_order(tmp_path):
    t0 = time.time() - 100
    for i in (1, 2, 3):
        touch(tmp_path / ck.checkpoint_name(i), t0 + i)
    names = lambda: [p.name for p in ck.resume_candidates(tmp_path)[0]]  # noqa: E731
    assert names() == ["model_0000003.pt", "model_0000002.pt", "model_0000001.pt"]  # no pointer: newest first

    ck.write_last(tmp_path, ck.checkpoint_name(2))
    os.utime(tmp_path / ck.LAST, (t0 + 2.5, t0 + 2.5))
    # model_3 was renamed into place after last_checkpoint was written (a crash between the
    # two renames): it comes first.
    assert names() == ["model_0000003.pt", "model_0000002.pt", "model_0000001.pt"]
    os.utime(tmp_path / ck.LAST, (t0 + 10, t0 + 10))  # a hand-edited pointer: it wins
    assert names() == ["model_0000002.pt", "model_0000003.pt", "model_0000001.pt"]
    assert ck.last_checkpoint(tmp_path).name == "model_0000002.pt"

    touch(tmp_path / "model_final.pt", t0 + 2.7)  # written between 2 and 3
    assert names() == ["model_0000002.pt", "model_0000003.pt", "model_final.pt", "model_0000001.pt"]
    (tmp_path / "model_final.pt").unlink()

    ck.write_last(tmp_path, "model_0000009.pt")  # names a missing file
    cands, notes = ck.resume_candidates(tmp_path)
    assert [p.name for p in cands][0] == "model_0000003.pt"
    assert len(notes) == 1 and "model_0000009.pt" in notes[0] and "does not exist" in notes[0]
    (tmp_path / ck.LAST).write_bytes(b"")  # empty (e.g. after a power loss)
    cands, notes = ck.resume_candidates(tmp_path)
    assert cands[0].name == "model_0000003.pt" and "empty" in notes[0]
    (tmp_path / ck.LAST).write_bytes(b"\xff\xfe\x00garbage")
    cands, notes = ck.resume_candidates(tmp_path)
    assert cands[0].name == "model_0000003.pt" and "last_checkpoint" in notes[0]

    stale = [tmp_path / ".model_0000004.pt.ab12_x.tmp", tmp_path / ".last_checkpoint.tmp",
             tmp_path / ".last_checkpoint.q9z_1.tmp"]
    for p in stale:
        p.write_bytes(b"half")
    (tmp_path / ".notes.tmp").write_text("someone else's")
    assert sorted(ck.remove_stale_temps(tmp_path)) == sorted(stale)
    assert (tmp_path / ".notes.tmp").is_file()


# ------------------------------------------------------------------------------ resume fallbacks
def test_resume_walks_back_past_corrupt_checkpoints(data_root, reference, tmp_path):
    """last_checkpoint names a truncated file, the one before is garbage: --resume warns about
    both (file and problem) and continues from the one before them, ending with the weights of
    the uninterrupted run."""
    out = seed_checkpoint_folder(reference, tmp_path / "run", 3)
    truncate(out / "model_0000003.pt")
    (out / "model_0000002.pt").write_bytes(b"<html>503 Service Unavailable</html>")
    (out / ".model_0000004.pt.k2j3_x.tmp").write_bytes(b"PK\x03\x04 half a checkpoint")  # a write cut off

    result = train(make_cfg(data_root, out, "checkpoint_period=0", "keep_last=2"), resume=True)
    assert result["status"] == "completed" and result["iteration"] == N
    log = (out / "log.txt").read_text()
    assert re.search(r"WARNING --resume: cannot continue from \S*model_0000003\.pt: .*truncated or corrupt", log), log
    assert re.search(r"WARNING --resume: cannot continue from \S*model_0000002\.pt: .*(corrupt|readable)", log), log
    assert RESUMED.search(log).group(2) == "1" and "fell back to" in log
    assert_same_weights(safe_load(out / "model_final.pt")["model"], reference[1]["model"])
    assert iterations_logged(out) == list(range(1, N + 1))  # the lost lines 2, 3 were dropped and rewritten
    assert not list(out.glob(".*.tmp"))


def test_resume_pointer_to_missing_file_and_nothing_usable(data_root, reference, tmp_path,
                                                           capsys):
    # last_checkpoint names a file that is gone: warn, continue from the newest one kept.
    out = seed_checkpoint_folder(reference, tmp_path / "gone", 3)
    (out / "model_0000003.pt").unlink()
    result = train(make_cfg(data_root, out, "stop_after=3"), resume=True)
    assert result["status"] == "stopped" and result["iteration"] == 3
    log = (out / "log.txt").read_text()
    assert re.search(r"WARNING --resume: \S*last_checkpoint names model_0000003\.pt, which does not exist", log), log
    assert RESUMED.search(log).group(2) == "2"
    assert_same_weights(safe_load(out / "model_0000003.pt")["model"],
                        safe_load(reference[0] / "model_0000003.pt")["model"])

    # Checkpoints exist but none loads: refuse (exit status 4) rather than start over on top of them.
    from proscale.cli import main

    bad = seed_checkpoint_folder(reference, tmp_path / "bad", 2)
    truncate(bad / "model_0000002.pt")
    (bad / "model_0000001.pt").write_bytes(b"")
    before = {p.name: p.read_bytes() for p in bad.glob("model_*.pt")}
    code = main(["train", "--preset", "m2f_tiny", "--data", f"synthetic:{data_root}", "--out", str(bad),
                 *OVERRIDES, "progress=false", "--resume"])
    err = capsys.readouterr().err
    assert code == 4, err[-2000:]
    message = err[err.index("error: --resume: none of the 2 checkpoints"):]
    assert re.search(r"\n  \S*model_0000002\.pt: not a readable torch checkpoint \(truncated or corrupt\?\)", message)
    assert re.search(r"\n  \S*model_0000001\.pt: the file is empty", message), message
    assert "another output folder" in message
    assert {p.name: p.read_bytes() for p in bad.glob("model_*.pt")} == before  # left as they were
    assert not (bad / "model_final.pt").exists()

    # Good checkpoints of another model (a changed override): refuse, no walking back.
    code = main(["train", "--preset", "m2f_tiny", "--data", f"synthetic:{data_root}", "--out", str(out),
                 *OVERRIDES, "progress=false", "decoder.num_queries=10", "--resume"])
    err = capsys.readouterr().err
    assert code == 4 and re.search(r"error: \S*model_0000003\.pt does not fit this run's model", err), err[-2000:]


# ------------------------------------------------------------------------------ non-finite steps
def test_nonfinite_steps_skipped_counted_then_stop(data_root, tmp_path, monkeypatch):
    """Iterations 2, 4, 5, 6 have a non-finite loss (2 and 6: NaN with NaN gradients; 4 and 5:
    +inf added to the loss, gradients finite). Each is skipped with a warning and leaves the model
    (parameters and BatchNorm statistics) exactly as it was; three in a row save and stop."""
    from proscale.models import criterion as crit_mod

    real = crit_mod.SetCriterion.forward
    calls = {"n": 0}

    def poisoned(self, outputs, targets):
        losses = real(self, outputs, targets)
        calls["n"] += 1
        if calls["n"] in (2, 6):
            losses["loss_mask"] = losses["loss_mask"] * float("nan")
        elif calls["n"] in (4, 5):
            losses["loss_dice"] = losses["loss_dice"] + torch.tensor(float("inf"))
        return losses

    monkeypatch.setattr(crit_mod.SetCriterion, "forward", poisoned)
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError) as info:
        train(make_cfg(data_root, out, "max_nonfinite=3", "checkpoint_period=1", "keep_last=0"))
    err = info.value
    assert err.iteration == 6 and Path(err.checkpoint) == out / "model_0000006.pt" and err.skipped == 4
    assert (out / "last_checkpoint").read_text().strip() == "model_0000006.pt"

    states = {i: safe_load(out / ck.checkpoint_name(i)) for i in range(1, 7)}
    assert same_state(states[2]["model"], states[1]["model"])  # skipped: unchanged, BN statistics too
    assert not same_state(states[3]["model"], states[2]["model"])  # a real step
    for i in (4, 5, 6):
        assert same_state(states[i]["model"], states[3]["model"]), i
    assert {int(s["step"]) for s in states[6]["optimizer"]["state"].values()} == {2}  # Adam stepped twice
    assert states[6]["iteration"] == 6 and states[6]["scheduler"]["last_epoch"] == 6

    records = {r["iteration"]: r for r in map(json.loads, open(out / "metrics.jsonl")) if "loss" in r}
    assert sorted(records) == [1, 2, 3, 4, 5, 6]
    assert {i for i, r in records.items() if r.get("nonfinite_steps")} == {2, 4, 5, 6}
    assert math.isfinite(records[3]["loss"]) and not math.isfinite(records[4]["loss"])
    log = (out / "log.txt").read_text()
    assert "iteration 2: non-finite loss, step skipped (1 in a row, 1 in this run" in log
    assert "iteration 6: non-finite loss, step skipped (3 in a row, 4 in this run" in log
    assert "ERROR 3 consecutive steps with a non-finite loss or gradient" in log

    # The checkpoint it stopped with resumes past the bad batches.
    monkeypatch.setattr(crit_mod.SetCriterion, "forward", real)
    result = train(make_cfg(data_root, out, "iterations=7"), resume=True)
    assert result["status"] == "completed" and result["iteration"] == 7 and result["nonfinite_steps"] == 0


# ------------------------------------------------------------------------------ signals
def test_sigint_saves_and_exits_cleanly(data_root, reference, tmp_path):
    """Ctrl-C (SIGINT) mid-run: the iteration finishes, a checkpoint is saved, exit status 0;
    --resume finishes with the uninterrupted run's weights."""
    out = tmp_path / "run"
    proc = subprocess.Popen(cli(data_root, out, "checkpoint_period=0"), env=ENV, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if (out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().strip():
                break
            time.sleep(0.01)
        assert proc.poll() is None, "the run ended before it could be interrupted"
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    status = json.loads(stdout.strip().splitlines()[-1])
    assert status["status"] == "interrupted", status
    k = status["iteration"]
    assert 1 <= k < N
    assert "received SIGINT" in stderr and "Traceback" not in stderr
    assert (out / "last_checkpoint").read_text().strip() == ck.checkpoint_name(k)
    assert safe_load(out / ck.checkpoint_name(k))["iteration"] == k
    assert not (out / "model_final.pt").exists()

    result = train(make_cfg(data_root, out, "checkpoint_period=0"), resume=True)
    assert result["status"] == "completed" and result["iteration"] == N
    assert_same_weights(safe_load(out / "model_final.pt")["model"], reference[1]["model"])


def test_sigkill_mid_run_then_resume(data_root, reference, tmp_path):
    """kill -9 after the second periodic checkpoint appears; `proscale train --resume` restarts
    from at least the last checkpoint written and ends with the uninterrupted run's weights."""
    out = tmp_path / "run"
    extra = ("checkpoint_period=2", "keep_last=2")
    proc = subprocess.Popen(cli(data_root, out, *extra), env=ENV, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and not (out / "model_0000004.pt").exists():
            time.sleep(0.005)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "model_final.pt").exists()
    assert json.loads((out / ".lock").read_text())["pid"] == proc.pid  # the killed run's lock file stays ...
    written = max(ck.iteration_of(p) for p in out.glob("model_0*.pt"))
    assert written >= 4

    resumed = subprocess.run(cli(data_root, out, *extra, "--resume"), env=ENV, cwd=ROOT, capture_output=True,
                             text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-3000:]  # ... and does not block --resume
    assert json.loads(resumed.stdout.strip().splitlines()[-1])["status"] == "completed"
    start = int(RESUMED.search(resumed.stderr).group(2))
    assert start >= written, (start, written)  # at most one checkpoint interval lost
    assert_same_weights(safe_load(out / "model_final.pt")["model"], reference[1]["model"])
    assert iterations_logged(out) == list(range(1, N + 1))
    assert periodic(out) == ["model_0000004.pt", "model_0000006.pt"]  # keep_last=2 (8 is model_final)
    assert (out / "last_checkpoint").read_text().strip() == "model_final.pt"
    assert not list(out.glob(".*.tmp"))


def test_second_run_into_a_folder_in_use_refuses(data_root, tmp_path):
    """Two `proscale train --out same`, the second started while the first runs: the second stops
    at once (exit 5) naming the first, which goes on alone (SIGTERM then ends it cleanly) with one
    metrics line per iteration."""
    out = tmp_path / "run"
    first = subprocess.Popen(cli(data_root, out, "iterations=100000"), env=ENV, cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and first.poll() is None and not (out / "metrics.jsonl").exists():
            time.sleep(0.01)
        assert first.poll() is None, "the first run ended before the second started"
        second = subprocess.run(cli(data_root, out), env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert first.poll() is None, "the first run ended before the second was refused"
        first.send_signal(signal.SIGTERM)
        first_out, first_err = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert second.returncode == 5, second.stderr[-2000:]
    assert f"in use by process {first.pid}" in second.stderr and "choose another --out" in second.stderr
    assert first.returncode == 0, first_err[-2000:]
    result = json.loads(first_out.strip().splitlines()[-1])
    assert result["status"] == "interrupted"
    assert iterations_logged(out) == list(range(1, result["iteration"] + 1))
