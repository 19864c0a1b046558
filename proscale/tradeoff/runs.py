"""Training and evaluating many (variant, seed) runs: one single-threaded process per core.

Why processes of one thread each: the models these comparisons train on a CPU are small, and
one thread per run is both the fastest use of the cores (small ops do not split well over
threads) and the reproducible one: a run's numbers do not depend on how many threads it got or
on what else the machine was doing. Two jobs on two cores take the time of one job on one.

Each run lives in its own folder (OUT/runs/<variant>/seed<k>) and is the engine's training
(`proscale.engine.train.train`, resumed when it was interrupted) followed by an evaluation of
model_final.pt on the validation data, written to result.json together with the id of the
settings. A run whose result.json has the same id is not redone; a folder that holds another
id's files is cleared first.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from proscale.config import TrainConfig, to_dict
from proscale.fileio import read_json, write_json

RESULT = "result.json"


@dataclass
class Job:
    """One training + evaluation. `cfg.output_dir` is the run folder."""

    variant: str
    seed: int
    cfg: TrainConfig
    val_spec: str
    val_split: str = "val"
    data_stamp: str = ""  # identifies the data's content (the specs name only where it lies)

    @property
    def folder(self) -> Path:
        return Path(self.cfg.output_dir)

    @property
    def id(self) -> str:
        """A hash of everything that decides the run's numbers (not where it is written, how
        often it checkpoints or logs, nor where a time-sliced run pauses)."""
        neutral = dataclasses.replace(self.cfg, output_dir="", progress=False, stop_after=0, checkpoint_period=0,
                                      keep_last=0, log_period=1, tensorboard=False)
        data = {"cfg": to_dict(neutral),
                "val": [self.val_spec, self.val_split], "data": self.data_stamp}
        return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def data_stamp(*specs: str) -> str:
    """A fingerprint of the data behind data specs ("kind:root"): names, sizes and modification
    times of the annotation files (or of the root's top-level entries), so that results on other
    data in the same place are not taken for these."""
    entries = []
    for spec in specs:
        root = Path(spec.split(":", 1)[-1])
        folder = root / "annotations" if (root / "annotations").is_dir() else root
        for p in sorted(folder.iterdir()) if folder.is_dir() else ():
            st = p.stat()
            entries.append([str(p), st.st_size, st.st_mtime_ns])
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()[:16]


def finished(job: Job) -> dict | None:
    """The stored result of this job's settings, or None."""
    result = read_json(job.folder / RESULT)
    return result if result and result.get("id") == job.id else None


def _evaluate(job: Job) -> dict:
    from proscale.data import build_dataloader, build_dataset, build_transforms
    from proscale.engine.evaluate import evaluate, tasks_from_config
    from proscale.predictor import load_for_inference

    model, settings = load_for_inference(job.folder / "model_final.pt", "cpu")
    dataset = build_dataset(job.val_spec, job.val_split, build_transforms(False, job.cfg.data))
    loader = build_dataloader(dataset, min(8, len(dataset)), train=False, num_workers=0)
    return evaluate(model, loader, dataset.metadata, tasks_from_config(job.cfg.test), settings.inference,
                    device="cpu")


def run_job(job: Job) -> dict:
    """Trains (or resumes) and evaluates one job in this process, with one thread; returns its
    result ({"id", "variant", "seed", "status", "iteration", "metrics", "train_seconds"})."""
    import torch

    torch.set_num_threads(1)
    if _PARENT is not None and os.getppid() != _PARENT:  # the parent is gone: take no queued job
        raise SystemExit(f"proscale worker {os.getpid()}: the process that started it has ended")
    _BUSY.set()
    try:
        return _run_job(job)
    finally:
        _BUSY.clear()


def _run_job(job: Job) -> dict:
    from proscale.engine.train import train

    done = finished(job)
    if done:
        return {**done, "status": "kept"}
    marker = read_json(job.folder / "job.json")
    if job.folder.is_dir() and (marker or {}).get("id") != job.id:
        shutil.rmtree(job.folder)  # another settings' checkpoints: the engine must not resume them
    write_json(job.folder / "job.json", {"id": job.id, "variant": job.variant, "seed": job.seed})
    start = time.perf_counter()
    # The run's log goes to its log.txt; several runs at once would interleave on the console.
    with open(os.devnull, "w") as quiet, contextlib.redirect_stderr(quiet):
        out = train(job.cfg, resume=True)
    seconds = (read_json(job.folder / "train_seconds.json") or 0.0) + time.perf_counter() - start
    write_json(job.folder / "train_seconds.json", seconds)
    result = {"id": job.id, "variant": job.variant, "seed": job.seed, "status": out["status"],
              "iteration": out["iteration"], "train_seconds": seconds}
    if out["status"] != "completed":
        return result
    result["metrics"] = summary_metrics(_evaluate(job))
    write_json(job.folder / RESULT, result)
    return result


def summary_metrics(results: dict) -> dict:
    """The numbers of an evaluation that the reports use (those it has): PQ, PQ_th, PQ_st and
    its parts SQ (segmentation quality) and RQ (recognition quality); mask AP, AP50, AP75; mIoU;
    a detector's box AP as box_AP, box_AP50, box_AP75."""
    wanted = {"panoptic": ("PQ", "PQ_th", "PQ_st", "SQ", "RQ"), "instance": ("AP", "AP50", "AP75"),
              "semantic": ("mIoU",)}
    out = {key: float(results[task][key]) for task, keys in wanted.items() for key in keys
           if (results.get(task) or {}).get(key) is not None}
    for key in ("AP", "AP50", "AP75"):
        if (results.get("detection") or {}).get(key) is not None:
            out[f"box_{key}"] = float(results["detection"][key])
    return out


def _worker_init() -> None:
    # One thread in every worker before torch starts its pools (see the module docstring).
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
    global _PARENT
    _PARENT = os.getppid()
    _stop_with_parent()
    threading.Thread(target=_exit_when_orphaned, daemon=True).start()


def _exit_when_orphaned() -> None:
    """Ends an idle worker whose parent is gone: it would wait for its next job forever."""
    while True:
        time.sleep(1.0)
        if os.getppid() != _PARENT and not _BUSY.is_set():
            os._exit(0)


_PARENT: int | None = None  # the pid that started this worker (None outside workers)
_BUSY = threading.Event()  # set while a worker runs a job


def _stop_with_parent() -> None:
    """Linux: SIGTERM this worker when the process that started it dies (even by SIGKILL), so
    that no orphan keeps training; the engine then saves a checkpoint and stops, and a re-run
    resumes. Elsewhere a no-op."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def run_jobs(jobs: list[Job], workers: int = 0, progress: bool = True, say=print,
             budget_s: float | None = None) -> list[dict]:
    """Runs `jobs` on `workers` processes (0: one per core), each single-threaded; returns their
    results in the order of `jobs`. Finished jobs are kept. A progress bar counts iterations over
    all jobs (from their metrics.jsonl). `budget_s`: warn once when the training is on course to
    take longer than that (a slow or busy machine: the results stay the same, they come later)."""
    results: dict[int, dict] = {}
    todo = []
    for i, job in enumerate(jobs):
        done = finished(job)
        if done:
            results[i] = {**done, "status": "kept"}
        else:
            todo.append(i)
    if not todo:
        return [results[i] for i in range(len(jobs))]
    workers = min(workers or default_workers(), len(todo))
    total = sum(jobs[i].cfg.iterations for i in todo)
    say(f"{len(todo)} runs to train ({len(jobs) - len(todo)} kept) on {workers} processes of one thread each")
    bar = _bar(total, progress)
    start, warned = time.perf_counter(), budget_s is None
    with ProcessPoolExecutor(max_workers=workers, initializer=_worker_init,
                             mp_context=_spawn_context()) as pool:
        pending = {pool.submit(run_job, jobs[i]): i for i in todo}
        try:
            while pending:
                done, _ = wait(pending, timeout=1.0, return_when=FIRST_COMPLETED)
                for future in done:
                    i = pending.pop(future)
                    results[i] = future.result()
                    r = results[i]
                    say(f"  {r['variant']} seed {r['seed']}: {r['status']}" +
                        (f", {_fmt_metrics(r['metrics'])}" if "metrics" in r else ""))
                done_its = sum(_iterations_logged(jobs[i]) for i in todo)
                if bar is not None:
                    bar.update(done_its - bar.n)
                elapsed = time.perf_counter() - start
                if not warned and done_its >= 0.05 * total and elapsed > 20:
                    projected = elapsed * total / done_its
                    if projected > 1.1 * budget_s:  # the early steps' pace is a rough guide
                        warned = True
                        say(f"warning: the training is on course to take {projected / 60:.0f} min, more than the "
                            f"{budget_s / 60:.0f} min expected on an idle 2-core CPU (this machine is slower or "
                            f"busy); the results will be the same, only later")
        except BaseException:
            for future in pending:
                future.cancel()
            raise
        finally:
            if bar is not None:
                bar.close()
    return [results[i] for i in range(len(jobs))]


def _spawn_context():
    import multiprocessing

    return multiprocessing.get_context("spawn")


def _bar(total: int, progress: bool):
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="train (all runs)", unit="it", dynamic_ncols=True, mininterval=1.0,
                file=sys.stderr, disable=None)


def _iterations_logged(job: Job) -> int:
    """The last training iteration in the job's metrics.jsonl (0 when none)."""
    path = job.folder / "metrics.jsonl"
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return 0
    for line in reversed(lines):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if "loss" in record:
            return int(record["iteration"])
    return 0


def _fmt_metrics(metrics: dict) -> str:
    return " ".join(f"{k} {v:.1f}" for k, v in metrics.items())
