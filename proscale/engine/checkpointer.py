"""Training checkpoints: the whole state of a run, written atomically, the last K kept, and the
choice of the one a resumed run continues from.

A training checkpoint is a whole-model checkpoint written atomically by
`proscale.checkpoints.io.save_model` ({"model", "config", "proscale_version"}; read back with
`safe_load`), plus what a resumed run needs:
    "iteration"        optimizer steps done
    "optimizer", "scheduler", "scaler"   their state_dicts
    "rng"              per rank: python / numpy / torch / cuda generator states
    "data"             batches each rank has consumed, and the batch layout they came in
    "metadata"         the data set's categories (a Predictor names and colours classes with them)
    "train_config"     the TrainConfig as a plain dict
Files: OUT/model_0005000.pt (periodic, the last `keep_last` kept), OUT/model_final.pt, and
OUT/last_checkpoint naming the newest one (what --resume reads).

Crash safety. A checkpoint file is written to a temp file, fsynced and renamed (atomic_save), and
only then does last_checkpoint move to it (also a fsynced rename), so a crash at any moment
leaves every model_*.pt complete and last_checkpoint naming a complete file; a crash between the
two renames leaves a complete checkpoint newer than the one last_checkpoint names.
`resume_candidates` orders what --resume tries:
  1. periodic checkpoints written after last_checkpoint was (that crash window; newest first),
  2. the file last_checkpoint names (as detectron2 does: editing it selects a checkpoint),
  3. every other checkpoint kept, newest first (model_final.pt placed by its write time),
and the trainer walks this list past files that are missing, truncated or not training
checkpoints, with a warning for each (see Trainer.resume for what it refuses outright).
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np
import torch

from proscale import distributed as du
from proscale.checkpoints.io import (CheckpointError, CorruptCheckpointError, UnsafeCheckpointError, load_checkpoint,
                                     safe_load, save_model)
from proscale.config import to_dict
from proscale.fileio import atomic_write

if TYPE_CHECKING:
    from proscale.engine.loop import Trainer

logger = logging.getLogger("proscale.train")

LAST = "last_checkpoint"
FINAL = "model_final.pt"
_PERIODIC = re.compile(r"^model_(\d{7,})\.pt$")
# Temp files of an interrupted atomic write (fileio: ".model_0000010.pt.k3j2_x.tmp", ".last_checkpoint.x1.tmp").
_STALE_TEMP = re.compile(r"^\.(model_(\d{7,}|final)\.pt|last_checkpoint)(\.[^/]+)?\.tmp$")
# What a training checkpoint must hold for a run to continue from it.
REQUIRED = {"model": Mapping, "iteration": int, "optimizer": Mapping, "scheduler": Mapping}


def checkpoint_name(iteration: int) -> str:
    return f"model_{iteration:07d}.pt"


def iteration_of(path: str | os.PathLike) -> int | None:
    """The iteration in a periodic checkpoint's name (model_0005000.pt -> 5000), else None."""
    m = _PERIODIC.match(Path(path).name)
    return int(m.group(1)) if m else None


def rng_state() -> dict:
    """This process's generator states, in types torch.load(weights_only=True) accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        states = state["cuda"][: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all(states)


def write_last(out_dir: str | os.PathLike, name: str) -> None:
    """Points OUT/last_checkpoint at `name` (atomically and durably: temp file, fsync, rename)."""
    atomic_write(Path(out_dir) / LAST, name + "\n")


def read_last(out_dir: str | os.PathLike) -> tuple[str | None, str | None]:
    """(the name OUT/last_checkpoint holds, None) or (None, what is wrong with the file);
    (None, None) when there is no last_checkpoint."""
    pointer = Path(out_dir) / LAST
    if not pointer.is_file():
        return None, None
    try:
        name = pointer.read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        return None, f"{pointer} cannot be read ({type(e).__name__}: {e})"
    if not name or "\n" in name or "\0" in name:
        return None, f"{pointer} does not hold a file name ({'empty' if not name else 'garbled'})"
    return name, None


def _periodic(out: Path) -> list[Path]:
    """OUT/model_XXXXXXX.pt files, oldest first."""
    return sorted((p for p in out.glob("model_*.pt") if _PERIODIC.match(p.name)), key=iteration_of)


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return -1


def resume_candidates(out_dir: str | os.PathLike) -> tuple[list[Path], list[str]]:
    """The checkpoints --resume should try, best first (see the module docstring), and notes
    about OUT/last_checkpoint when it is unreadable or names a missing file (to log as warnings)."""
    out = Path(out_dir)
    periodic = _periodic(out)[::-1]  # newest first
    final = out / FINAL
    notes: list[str] = []
    name, problem = read_last(out)
    if problem:
        notes.append(problem)
    target = out / name if name else None
    if target is not None and not target.is_file():
        notes.append(f"{out / LAST} names {name}, which does not exist")
        target = None

    first: list[Path] = []
    if target is not None:
        # Crash window: a complete periodic checkpoint renamed into place after the pointer was
        # last written, newer than what it names. (A hand-edited pointer is newer than the files.)
        written = _mtime(out / LAST)
        target_it = iteration_of(target)
        first = [p for p in periodic if p != target and _mtime(p) > written
                 and (target_it is None or iteration_of(p) > target_it)]
        first.append(target)
    rest = [p for p in periodic if p not in first]
    if final.is_file() and final not in first:
        t = _mtime(final)
        at = next((i for i, p in enumerate(rest) if _mtime(p) <= t), len(rest))
        rest.insert(at, final)
    return first + rest, notes


def last_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The checkpoint --resume tries first (`resume_candidates`), or None when there is none."""
    candidates, _ = resume_candidates(out_dir)
    return candidates[0] if candidates else None


def check_training_checkpoint(obj: Any, path: str | os.PathLike) -> None:
    """Raises CorruptCheckpointError unless `obj` (a loaded file) holds a training state to
    continue from (a whole-model checkpoint without optimizer state is not one)."""
    if not isinstance(obj, Mapping):
        raise CorruptCheckpointError(f"{path}: not a training checkpoint (holds a {type(obj).__name__})")
    for key, kind in REQUIRED.items():
        if key not in obj:
            raise CorruptCheckpointError(f"{path}: not a complete training checkpoint: no {key!r}")
        if not isinstance(obj[key], kind) or (kind is int and isinstance(obj[key], bool)):
            raise CorruptCheckpointError(f"{path}: not a complete training checkpoint: {key!r} is a "
                                         f"{type(obj[key]).__name__}")
    if obj["iteration"] < 0:
        raise CorruptCheckpointError(f"{path}: iteration {obj['iteration']} is negative")


def remove_stale_temps(out_dir: str | os.PathLike) -> list[Path]:
    """Deletes the temp files of checkpoint writes that a crash interrupted (never complete
    files: those are renamed into place only once written)."""
    removed = []
    for p in Path(out_dir).glob(".*.tmp"):
        if _STALE_TEMP.match(p.name) and p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def prune(out_dir: str | os.PathLike, keep_last: int) -> list[Path]:
    """Deletes all but the newest `keep_last` periodic checkpoints (keep_last <= 0 keeps all).

    model_final.pt and whatever last_checkpoint names are never deleted. Counting stops at the
    one last_checkpoint names: files newer than it (from a run that went on past it before it
    was resumed from here, or that could not be read) are left alone, to be overwritten as the
    run reaches their iteration again, so that `keep_last` good checkpoints remain to fall back to.
    """
    if keep_last <= 0:
        return []
    out = Path(out_dir)
    protected, _ = read_last(out)
    files = _periodic(out)
    upto = iteration_of(protected) if protected else None
    if upto is not None:
        files = [p for p in files if iteration_of(p) <= upto]
    removed = []
    for p in files[:-keep_last]:
        if p.name != protected:
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


# ------------------------------------------------------------------------------ save
def metadata_dict(metadata) -> dict:
    """Categories as plain data (stored in checkpoints; a Predictor rebuilds names and colours)."""
    return {"name": metadata.name,
            "categories": [{"id": c.id, "name": c.name, "isthing": bool(c.isthing), "color": list(c.color)}
                           for c in metadata.categories]}


def plain(value) -> Any:
    """A config as JSON-able plain data (tuples become lists): for checkpoints and config.yaml."""
    return json.loads(json.dumps(value))


def save_training_checkpoint(trainer: "Trainer", name: str | None = None) -> Path:
    """Writes OUT/<name or model_XXXXXXX.pt> with the whole training state (rank 0), points
    last_checkpoint at it and prunes old ones. Every rank must call it: RNG states are gathered."""
    rngs = du.all_gather_object(rng_state())
    path = trainer.out / (name or checkpoint_name(trainer.iteration))
    if trainer.info.is_main:
        W, A = trainer.info.world_size, trainer.cfg.solver.accumulate
        extra = {"iteration": trainer.iteration, "optimizer": trainer.optimizer.state_dict(),
                 "scheduler": trainer.scheduler.state_dict(), "scaler": trainer.scaler.state_dict(), "rng": rngs,
                 "data": {"batches_per_rank": trainer.iteration * A, "micro_batch": trainer.micro, "world_size": W,
                          "accumulate": A},
                 "metadata": metadata_dict(trainer.metadata), "train_config": plain(to_dict(trainer.cfg))}
        save_model(trainer.model, path, extra=extra)
        write_last(trainer.out, path.name)
        prune(trainer.out, trainer.cfg.keep_last)
    du.barrier()
    return path


# ------------------------------------------------------------------------------ resume
def first_line(err: BaseException, limit: int = 200) -> str:
    """An error's first sentence or so (torch's load errors run to a paragraph of advice)."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if len(text) > limit:
        cut = text.find(". ", 60)
        text = text[:cut + 1] if 0 < cut < limit else text[:limit] + " ..."
    return text


def resume(trainer: "Trainer") -> Path | None:
    """Continues `trainer` from the newest good checkpoint in its output folder; returns its path
    (None: no checkpoint at all, a fresh start).

    Rank 0 walks `resume_candidates` (last_checkpoint, or a complete newer file a crash left it
    behind, then the older ones) past every file that is missing, truncated or otherwise
    unreadable, or not a training checkpoint, logging a warning that names the file and the
    problem; the other ranks load the file it chose. It refuses (CheckpointError), as detectron2
    and Lightning do for a checkpoint they cannot load, rather than starting over when
      - checkpoint files exist but none of them can be read: starting afresh would overwrite
        and prune them (move them away, or use another output folder, to start over);
      - a checkpoint asks to run code (UnsafeCheckpointError): nothing of it ran;
      - a readable checkpoint does not fit the model or optimizer (another preset or overrides
        than the run had): an older one would not fit either.
    With no checkpoint at all it starts from scratch with a log line (detectron2's
    resume_or_load, Lightning's ckpt_path="last", Megatron and torchtitan do the same).
    """
    out, main = trainer.out, trainer.info.is_main
    chosen, error = None, None
    if main:
        for p in remove_stale_temps(out):
            logger.info("removed %s, the temp file of a checkpoint write that was interrupted", p)
        try:
            chosen = _resume_on_main(trainer)
        except CheckpointError as e:
            error = e
    decision = du.broadcast_object({"name": chosen.name if chosen else None, "error": str(error) if error else None})
    if error is not None:
        raise error
    if decision["error"]:
        raise CheckpointError(decision["error"])
    if decision["name"] is None:
        return None
    if not main:
        chosen = out / decision["name"]
        ckpt = safe_load(chosen)
        check_training_checkpoint(ckpt, chosen)
        load_training_state(trainer, ckpt, chosen)
    trainer.resumed_from = chosen
    if main:
        logger.info("resumed from %s at iteration %d", chosen, trainer.iteration)
    return chosen


def _resume_on_main(trainer: "Trainer") -> Path | None:
    """The first good resume candidate, its state loaded into the trainer; None when the folder
    holds no checkpoint. See `resume`."""
    out = trainer.out
    candidates, notes = resume_candidates(out)
    for note in notes:
        logger.warning("--resume: %s; looking for the newest checkpoint kept instead", note)
    if not candidates:
        logger.info("--resume: no checkpoint in %s, starting from scratch", out)
        return None
    problems = []
    for path in candidates:
        try:
            ckpt = safe_load(path)
            check_training_checkpoint(ckpt, path)
        except UnsafeCheckpointError:
            raise
        except (CheckpointError, OSError) as e:  # corrupt, truncated, gone since listed, unreadable
            problem = first_line(e)
            if problem.startswith(f"{path}: "):
                problem = problem[len(f"{path}: "):]
            problems.append(f"{path}: {problem}")
            later = "trying the next newest one" if path != candidates[-1] else "no older checkpoint left"
            logger.warning("--resume: cannot continue from %s: %s; %s", path, problem, later)
            continue
        load_training_state(trainer, ckpt, path)
        if problems:
            logger.warning("--resume: fell back to %s (iteration %d) past %d unusable checkpoint(s)", path,
                           trainer.iteration, len(problems))
        return path
    raise CheckpointError(
        f"--resume: none of the {len(candidates)} checkpoints in {out} can be resumed from:\n"
        + "\n".join(f"  {p}" for p in problems)
        + "\nRefusing to start from scratch over them: move them away or choose another output folder "
          "to start over (or fix last_checkpoint to name a good file).")


def load_training_state(trainer: "Trainer", ckpt: dict, path: Path) -> None:
    """Model, optimizer, schedule, scaler, RNG and data position from a checked checkpoint.
    A checkpoint that does not fit raises CheckpointError naming it."""
    optimizer, scheduler = trainer.optimizer, trainer.scheduler
    try:
        load_checkpoint(trainer.model, ckpt, strict=True, source="proscale")
        # Optimizer state (moments, step counts) from the checkpoint; hyper-parameters and the
        # schedule from the current config, so a resumed run may change them (e.g. more iterations).
        hparams = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        optimizer.load_state_dict(ckpt["optimizer"])
    except (CheckpointError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path} does not fit this run's model / optimizer (another preset or model "
                              f"overrides?): {e}") from None
    for group, h in zip(optimizer.param_groups, hparams):
        group.update(h)
    sched = {k: v for k, v in ckpt["scheduler"].items() if k not in ("base_lrs", "_last_lr")}
    scheduler.load_state_dict({**sched, "lr_lambdas": [None] * len(optimizer.param_groups)})
    factor = scheduler.lr_lambdas[0](scheduler.last_epoch)
    for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
        group["lr"] = base * factor
    if ckpt.get("scaler") and trainer.scaler.is_enabled():
        trainer.scaler.load_state_dict(ckpt["scaler"])
    info = trainer.info
    rngs = ckpt.get("rng") or []
    if len(rngs) == info.world_size:
        set_rng_state(rngs[info.rank])
    trainer.iteration = int(ckpt["iteration"])
    W, A = info.world_size, trainer.cfg.solver.accumulate
    data = ckpt.get("data") or {}
    if (data.get("micro_batch"), data.get("world_size"), data.get("accumulate")) == (trainer.micro, W, A):
        trainer.consumed = int(data["batches_per_rank"])
    else:
        # Another batch layout: continue after as many images as were seen, as near as batches allow.
        trainer.consumed = trainer.iteration * A
        if info.is_main:
            logger.warning("%s was written with another batch layout: the data order continues approximately, "
                           "not exactly", path)
