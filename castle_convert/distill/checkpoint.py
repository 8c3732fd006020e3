"""Resumable training state, written without pickles and read without unpickling.

Accelerate's ``save_state`` / ``load_state`` pickle the registered objects and the RNG states and
unpickle them on resume (``weights_only=False``): anyone who can write into a run directory could run
code through ``--resume``. This module writes the same state as safetensors + JSON only:

* ``student.safetensors`` — the student's weights (training form);
* ``optimizer.safetensors`` — the optimizer's tensors (``state.<param index>.<name>``);
* ``state.json`` — step, anneal position, optimizer param groups and scalars, grad-scaler state, the
  resolved recipe, what the run trained on (dataset, sizes, processes);
* ``rng_<rank>.json`` — the Python / NumPy / torch (and CUDA) RNG states of each process;
* ``recipe.yaml`` — the resolved recipe, to resume with ``--recipe OUTPUT.run/checkpoint/recipe.yaml``.

One rule on resume: the recipe must be the interrupted run's. Any key that changes what is trained
(everything except :data:`NOT_COMPARED`) that differs is a :class:`ResumeError` naming the keys, before
any model or data is loaded. A tampered or truncated file is a one-line ``ResumeError`` too.
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import random
import shutil
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch
from torch import nn

from castle_convert.config import error_line
from castle_convert.recipes import flatten

FORMAT = 1
WEIGHTS, OPTIMIZER, STATE, RECIPE = "student.safetensors", "optimizer.safetensors", "state.json", "recipe.yaml"
CHECKPOINT, CHECKPOINT_TMP = "checkpoint", "checkpoint.tmp"
# Stage 1's record in the run directory: started.json when it begins (a kill during it: --resume redoes it), then
# the student after it, the RNG states of every process (rng_<rank>.json) and stage1.json (written last: done).
STAGE1_DIR, STAGE1_WEIGHTS, STAGE1_REPORT, STAGE1_STARTED = "stage1", "student.safetensors", "stage1.json", "started.json"
# Recipe keys that only change logging / evaluation cadence / data-loading parallelism: free to differ.
NOT_COMPARED = ("name", "model", "log_every", "save_every", "eval_every", "data.workers")
# What Accelerate's save_state writes: an older castle-convert's checkpoint (never loaded: pickles).
_ACCELERATE_FILES = ("random_states_0.pkl", "optimizer.bin", "scheduler.bin", "custom_checkpoint_0.pkl",
                     "pytorch_model.bin", "model.safetensors")


class ResumeError(RuntimeError):
    """--resume was asked for but there is nothing (usable) to resume."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, ...); the one that was there before is intact."""


@contextlib.contextmanager
def writing(target: Path, cleanup: list[Path], kept: str) -> Iterator[None]:
    """Write a checkpoint: an OSError (e.g. ENOSPC) removes the partial ``cleanup`` paths and becomes a one-line
    :class:`CheckpointWriteError` naming ``target`` and what is ``kept``."""
    try:
        yield
    except OSError as e:
        for p in cleanup:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        raise CheckpointWriteError(f"cannot write the checkpoint {target}: {e.strerror or type(e).__name__}"
                                   f"{f' ({e.filename})' if e.filename else ''}: free space (or fix the folder), then "
                                   f"run again with --resume; {kept}") from None


def _start_over(work_dir: Path) -> str:
    return f"start over with --overwrite (it deletes {work_dir})"


def recipe_differences(saved: dict, current: dict) -> dict[str, tuple[Any, Any]]:
    """``{key: (value in the run, value now)}`` for every compared key that differs."""
    a, b = flatten(saved), flatten(current)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
            if k not in NOT_COMPARED and a.get(k) != b.get(k)}


def latest_checkpoint(work_dir: Path) -> Optional[Path]:
    """The stage-2 checkpoint to resume: ``checkpoint/``, or a complete ``checkpoint.tmp/`` when a kill came between
    the two renames of :func:`save` (``checkpoint/`` already moved away, the newer one not yet in its place)."""
    for name in (CHECKPOINT, CHECKPOINT_TMP):
        if (work_dir / name / STATE).is_file():
            return work_dir / name
    return None


def resumable(work_dir: Path) -> Optional[Path]:
    """What an interrupted run left to resume in ``work_dir`` (a stage-2 checkpoint, a finished or started stage 1),
    or None. A plain rerun refuses to start over it (it would be deleted): --resume or --overwrite."""
    candidates = [latest_checkpoint(work_dir), work_dir / CHECKPOINT, work_dir / STAGE1_DIR / STAGE1_REPORT,
                  work_dir / STAGE1_DIR / STAGE1_STARTED]
    return next((p for p in candidates if p is not None and p.exists()), None)


def promote(work_dir: Path, accelerator) -> None:
    """Put a complete ``checkpoint.tmp/`` (see :func:`latest_checkpoint`) in place as ``checkpoint/`` (main process)."""
    ckpt, tmp = work_dir / CHECKPOINT, work_dir / CHECKPOINT_TMP
    if accelerator.is_main_process and not ckpt.exists() and latest_checkpoint(work_dir) == tmp:
        tmp.rename(ckpt)
        shutil.rmtree(work_dir / (CHECKPOINT + ".old"), ignore_errors=True)
        accelerator.print(f"the checkpoint saved as the run was interrupted is complete: using it ({tmp.name})")
    accelerator.wait_for_everyone()


def saved_record(work_dir: Path) -> Optional[tuple[Path, dict]]:
    """(file, its JSON) of what an interrupted run recorded: the stage-2 checkpoint, else stage 1 (finished or
    started)."""
    ckpt = latest_checkpoint(work_dir) or work_dir / CHECKPOINT
    for file in (ckpt / STATE, work_dir / STAGE1_DIR / STAGE1_REPORT, work_dir / STAGE1_DIR / STAGE1_STARTED):
        if file.is_file():
            try:
                record = json.loads(file.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ResumeError(f"--resume: {file} is not valid JSON ({str(e)[:80]}): {_start_over(work_dir)}") from None
            if not isinstance(record, dict):
                raise ResumeError(f"--resume: {file} is not a castle-convert checkpoint record: {_start_over(work_dir)}")
            return file, record
    return None


def check_resume(work_dir: Path, recipe_dict: dict) -> None:
    """Before any work: the interrupted run's checkpoint is in this format and used this recipe."""
    ckpt = work_dir / CHECKPOINT
    if ckpt.is_dir() and not (ckpt / STATE).is_file():
        old = [n for n in _ACCELERATE_FILES if (ckpt / n).exists()]
        what = (f"was written by an older castle-convert in Accelerate's pickle format ({old[0]}), which is never "
                "unpickled" if old else "is incomplete (no state.json)")
        raise ResumeError(f"--resume: the checkpoint in {ckpt} {what}: {_start_over(work_dir)}")
    found = saved_record(work_dir)
    if found is None:
        return
    file, record = found
    if "recipe" not in record:
        raise ResumeError(f"--resume: {file} records no recipe (written by an older castle-convert): "
                          f"{_start_over(work_dir)}")
    diff = recipe_differences(record["recipe"], recipe_dict)
    if diff:
        shown = "; ".join(f"{k}: {a!r} in the run, {b!r} now" for k, (a, b) in list(diff.items())[:6])
        more = f" (and {len(diff) - 6} more)" if len(diff) > 6 else ""
        raise ResumeError(f"--resume: the recipe differs from the interrupted run's ({shown}{more}): resume with "
                          f"the same recipe and --set values (its copy: {work_dir / 'checkpoint' / RECIPE}), "
                          f"or {_start_over(work_dir)}")


# -- writing -------------------------------------------------------------------------------------

def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode()


def _rng_state() -> dict:
    py = random.getstate()
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": [py[0], list(py[1]), py[2]],
             "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
             "torch": _b64(torch.get_rng_state())}
    if torch.cuda.is_available():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def write_rng(folder: Path, rank: int) -> None:
    """This process's Python / NumPy / torch (CUDA) RNG states as ``folder/rng_<rank>.json``."""
    (folder / f"rng_{rank}.json").write_text(json.dumps(_rng_state()))


def read_rng(folder: Path, rank: int) -> None:
    """Restore what :func:`write_rng` wrote (the caller reports a missing or damaged file)."""
    _set_rng_state(json.loads((folder / f"rng_{rank}.json").read_text()))


def _set_rng_state(state: dict) -> None:
    v, keys, gauss = state["python"]
    random.setstate((int(v), tuple(int(k) for k in keys), gauss))
    name, np_keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((str(name), np.asarray(np_keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)
                                      for s in state["cuda"]])


def _jsonable(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, float) and not math.isfinite(v):
        return repr(v)
    return v


def _optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, entry in sd["state"].items():
        for name, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"state.{idx}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{idx}.{name}"] = _jsonable(value)
    return tensors, {"param_groups": _jsonable(sd["param_groups"]), "scalars": scalars}


def save(ckpt_dir: Path, accelerator, *, model: nn.Module, optimizer, step: int, anneal_epoch: float,
         recipe_dict: dict, run_info: dict) -> None:
    """Write the resumable state to a temp folder, then swap it in (a kill never leaves half a checkpoint)."""
    import yaml
    from safetensors.torch import save_file

    tmp = ckpt_dir.with_name(ckpt_dir.name + ".tmp")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    kept = (f"the previous checkpoint (step {_recorded_step(ckpt_dir)}) is intact in {ckpt_dir}"
            if (ckpt_dir / STATE).is_file() else "no earlier checkpoint was written")
    with writing(tmp, [tmp], kept):
        if accelerator.is_main_process:
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        write_rng(tmp, accelerator.process_index)
        if accelerator.is_main_process:
            save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(tmp / WEIGHTS))
            tensors, optim_json = _optimizer_state(optimizer)
            save_file(tensors, str(tmp / OPTIMIZER))
            scaler = getattr(accelerator, "scaler", None)
            record = {"format": FORMAT, "step": int(step), "anneal_epoch": float(anneal_epoch),
                      "optimizer": optim_json, "scaler": _jsonable(scaler.state_dict()) if scaler is not None else None,
                      "recipe": recipe_dict, "run": run_info}
            (tmp / RECIPE).write_text(yaml.safe_dump(recipe_dict, sort_keys=False))
            (tmp / STATE).write_text(json.dumps(record, indent=1))          # last: marks the folder complete
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        old = ckpt_dir.with_name(ckpt_dir.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if ckpt_dir.exists():
            ckpt_dir.rename(old)
        tmp.rename(ckpt_dir)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _recorded_step(ckpt_dir: Path) -> Any:
    try:
        return json.loads((ckpt_dir / STATE).read_text()).get("step", "?")
    except (OSError, ValueError, AttributeError):
        return "?"


# -- reading -------------------------------------------------------------------------------------

def _restore_optimizer(optimizer, tensors: dict[str, torch.Tensor], optim_json: dict, file: Path) -> None:
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        i = int(idx)
        if not 0 <= i < len(params):
            raise ValueError(f"optimizer entry {key} names parameter {i} of {len(params)}")
        if name in ("exp_avg", "exp_avg_sq", "momentum_buffer") and tuple(value.shape) != tuple(params[i].shape):
            raise ValueError(f"optimizer entry {key} has shape {tuple(value.shape)}, the parameter {tuple(params[i].shape)}")
        state.setdefault(i, {})[name] = value.to(params[i].device)
    for key, value in optim_json["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    groups = optim_json["param_groups"]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def load(ckpt_dir: Path, accelerator, *, model: nn.Module, optimizer, run_info: dict) -> dict:
    """Restore what :func:`save` wrote into ``model``/``optimizer``/RNGs; returns the state.json record."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    work_dir = ckpt_dir.parent
    file = ckpt_dir / STATE
    try:
        record = json.loads(file.read_text())
        if record.get("format") != FORMAT:
            raise ValueError(f"format {record.get('format')!r}, this castle-convert reads {FORMAT}")
        recorded = record.get("run") or {}
        differs = {k: (recorded.get(k), v) for k, v in run_info.items() if recorded.get(k) != v}
        if differs:
            raise ResumeError("--resume: the interrupted run trained on something else (" + "; ".join(
                f"{k}: {a!r} in the run, {b!r} now" for k, (a, b) in differs.items()) +
                f"): resume with the same MODEL, --data and process count, or {_start_over(work_dir)}")
        weights = load_file(str(ckpt_dir / WEIGHTS), device=str(accelerator.device))
        model.load_state_dict(weights, strict=True)
        _restore_optimizer(optimizer, load_file(str(ckpt_dir / OPTIMIZER)), record["optimizer"], ckpt_dir / OPTIMIZER)
        scaler = getattr(accelerator, "scaler", None)
        if scaler is not None and record.get("scaler"):
            scaler.load_state_dict(record["scaler"])
        read_rng(ckpt_dir, accelerator.process_index)
        step, epoch = int(record["step"]), float(record["anneal_epoch"])
        if step < 0 or not math.isfinite(epoch):
            raise ValueError(f"step {step}, anneal epoch {epoch}")
    except ResumeError:
        raise
    except (OSError, ValueError, KeyError, TypeError, IndexError, RuntimeError, SafetensorError) as e:
        raise ResumeError(f"--resume: the checkpoint in {ckpt_dir} is damaged or does not fit this student "
                          f"({error_line(e, 160)}): {_start_over(work_dir)}") from None
    return record
