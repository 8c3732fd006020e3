"""The distillation fine-tune on Accelerate.

Frozen teacher (eval mode, not wrapped for DDP); student in training form; the anneal schedule
moves g_t / τ_t on fractional epochs; resumable state every ``save_every`` optimizer steps.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader

from castle_convert.adapters import cast_inputs
from castle_convert.config import ConfigError, error_line
from castle_convert.convert import finalize, primary_output, set_schedule, training_forms
from castle_convert.data import DataBundle, DataError, Materialized
from castle_convert.distill import checkpoint, losses
from castle_convert.distill.checkpoint import CheckpointWriteError, ResumeError  # noqa: F401 - the CLI's
from castle_convert.distill.losses import DivergenceError
from castle_convert.distill.evaluate import embeddings, evaluate, head_classes
from castle_convert.distill.schedule import AnnealSchedule, lr_scheduler
from castle_convert.distill.transfer import resize_batch
from castle_convert.recipes import Recipe


@dataclass
class TrainState:
    """Optimizer steps taken; checkpointed with the rest of the run (distill/checkpoint.py)."""

    step: int = 0


@dataclass
class DistillResult:
    student: nn.Module                       # finalized (inference form), unwrapped, on CPU
    teacher_eval: dict
    student_start_eval: dict                 # training form before any step (== teacher)
    student_train_form_eval: dict            # training form at g = 0 after distillation
    student_final_eval: dict                 # finalized
    steps: int
    epochs: float
    wall_time_s: float                       # stage 2 (end-to-end distillation)
    images_per_s: float
    history: list = field(default_factory=list)
    transfer: Optional[dict] = None          # stage 1: TransferResult.to_dict() (per-layer errors, time)
    kept_softmax: list = field(default_factory=list)   # hybrid: attention paths left softmax


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith("gamma") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _converted_paths(student: nn.Module) -> list[str]:
    return list(getattr(student, "castling_converted", []))


class _OutputCapture:
    """Forward hooks collecting the outputs of the converted attention paths (attention transfer)."""

    def __init__(self, model: nn.Module, paths: list[str]):
        self.outputs: list[torch.Tensor] = []
        self.handles = [model.get_submodule(p).register_forward_hook(self._hook) for p in paths]

    def _hook(self, module, args, out) -> None:
        self.outputs.append(out[0] if isinstance(out, tuple) else out)

    def take(self) -> list[torch.Tensor]:
        out, self.outputs = self.outputs, []
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _unwrap(model: nn.Module) -> nn.Module:
    """The student itself: out of DDP and without Accelerate's mixed-precision (autocast) wrapper on ``forward``."""
    from accelerate.utils import extract_model_from_parallel
    raw = extract_model_from_parallel(model, keep_fp32_wrapper=False)
    bound = raw.__dict__.get("forward")
    if getattr(bound, "__func__", None) is type(raw).forward:      # what the unwrapping leaves: the class's own
        del raw.__dict__["forward"]
    return raw


def _mean_mask_density(model: nn.Module) -> float:
    values = [m.last_mask_density for _, m in training_forms(model) if m.last_mask_density is not None]
    return float(torch.stack([v.float().cpu() for v in values]).mean()) if values else 1.0


def process_state():
    """Accelerate's process state; without CUDA, distributed runs use gloo on CPU (MULTI_CPU)."""
    from accelerate import PartialState
    return PartialState(cpu=not torch.cuda.is_available())


def _accelerator(recipe: Recipe, work_dir: Optional[Path], grad_accum: int):
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration
    project = ProjectConfiguration(project_dir=str(work_dir), logging_dir=str(work_dir / "tensorboard")) \
        if work_dir else None
    process_state()
    from accelerate.state import AcceleratorState
    shared = AcceleratorState._shared_state
    if shared and shared.get("_mixed_precision") not in (None, recipe.mixed_precision):
        AcceleratorState._reset_state()     # a later cc.distill in this process (a notebook) with another precision
    return Accelerator(cpu=not torch.cuda.is_available(), gradient_accumulation_steps=grad_accum,
                       mixed_precision=recipe.mixed_precision,
                       log_with="tensorboard" if work_dir else None, project_config=project,
                       dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))


class EngineUnsupported(ConfigError):
    """An Accelerate engine cc.distill does not run (FSDP / DeepSpeed / Megatron): a launch-configuration
    error (a ConfigError, so the CLI reports it in one line)."""


def check_engine(accelerator) -> None:
    """cc.distill runs on one process or DDP (``accelerate launch --multi_gpu`` / multi-CPU). FSDP and
    DeepSpeed shard the parameters: the end-of-run finalize and save need the gathered model, and
    DeepSpeed takes gradient clipping from its own config (the recipe's ``clip_grad`` would be ignored)."""
    engine = str(getattr(getattr(accelerator, "distributed_type", None), "value", "")).upper()
    if engine in ("FSDP", "DEEPSPEED", "MEGATRON_LM", "XLA_FSDP"):
        raise EngineUnsupported(
            f"cc.distill does not run under {engine}: launch it on one process or with DDP (accelerate launch "
            "--multi_gpu, no --use_fsdp/--use_deepspeed; a ViT student fits on one device). For a sharded run use "
            "your own loop with cc.GateSchedule, gather the full state dict, then cc.finalize on one process")


def distill(teacher: nn.Module, student: nn.Module, data: DataBundle, recipe: Recipe, *,
            work_dir: Optional[Path] = None, resume: bool = False, progress: bool = True,
            on_step: Optional[Callable[[int], None]] = None, accelerator=None) -> DistillResult:
    """Distil ``student`` (a converted training form) against ``teacher`` on ``data``.

    Args:
        work_dir: where resumable state (``checkpoint/``) and TensorBoard logs go; None = neither.
        resume: continue from ``work_dir/checkpoint``.
        on_step: called with the optimizer step count after every step (tests use it).
    Returns the finalized student and the evaluations (teacher, student at start, training form at
    g = 0, finalized).
    """
    from accelerate.utils import set_seed

    if not training_forms(student):
        raise ValueError("student has no castling training-form attention: pass cc.convert(teacher)")
    n_classes = head_classes(teacher)
    classify = n_classes is not None
    labelled = data.num_classes > 0
    if classify and not labelled and recipe.distill.alpha < 1.0:
        raise DataError(f"dataset '{data.name}' has no labels: distil the classifier on its own soft labels with "
                        f"--set distill.alpha=1.0 (now {recipe.distill.alpha:g}), or use labelled data")
    if classify and labelled and n_classes != data.num_classes:
        raise DataError(
            f"dataset '{data.name}' has {data.num_classes} classes but the teacher's head has {n_classes}: "
            "use a teacher fine-tuned on this dataset (or a headless backbone, distilled on features)")
    opt = recipe.optim
    work_dir = Path(work_dir) if work_dir else None
    ckpt_dir = work_dir / checkpoint.CHECKPOINT if work_dir else None
    if resume and not (work_dir and checkpoint.resumable(work_dir)):
        raise ResumeError(f"--resume: no checkpoint to resume in {ckpt_dir} (the run saves one every "
                          f"save_every={recipe.save_every} steps)")
    if resume:
        checkpoint.check_resume(work_dir, recipe.to_dict())

    accelerator = accelerator or _accelerator(recipe, work_dir, opt.grad_accum)
    check_engine(accelerator)
    if resume:
        checkpoint.promote(work_dir, accelerator)
    set_seed(recipe.seed)
    world = accelerator.num_processes
    if opt.batch_size % (world * opt.grad_accum):
        raise ValueError(f"optim.batch_size={opt.batch_size} must be divisible by processes ({world}) × "
                         f"grad_accum ({opt.grad_accum})")
    per_device = opt.batch_size // (world * opt.grad_accum)
    from castle_convert.data import Materialized
    workers = 0 if isinstance(data.train, Materialized) else recipe.data.workers
    # Not persistent: workers are re-created each epoch and see the dataset's set_epoch().
    train_loader = DataLoader(data.train, batch_size=per_device, shuffle=True, drop_last=True,
                              num_workers=workers, generator=torch.Generator().manual_seed(recipe.seed))
    val_loader = DataLoader(data.val, batch_size=per_device, shuffle=False,
                            num_workers=0 if isinstance(data.val, Materialized) else recipe.data.workers,
                            generator=torch.Generator().manual_seed(recipe.seed))
    if len(train_loader) // world < opt.grad_accum:
        raise DataError(f"dataset '{data.name}' has {len(data.train)} training images: fewer than one "
                        f"global batch of {opt.batch_size}")

    # The teacher runs under no_grad in eval mode; its requires_grad flags are left as the user set
    # them (a later convert(teacher) must not inherit frozen weights). Its mode is restored at the end.
    teacher_was_training = teacher.training
    teacher = teacher.to(accelerator.device).eval()
    if not any(p.requires_grad for p in student.parameters()):
        raise ValueError("student has no trainable parameters (requires_grad is False everywhere)")
    student = student.to(accelerator.device)
    stage1 = run_stage1(teacher, student, data, recipe, accelerator, work_dir, resume=resume, progress=progress)
    kept_softmax = list(stage1.get("kept_softmax", [])) if stage1 else []
    trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
    total_params = sum(p.numel() for p in student.parameters())
    optimizer = torch.optim.AdamW(_param_groups(student, opt.weight_decay), lr=opt.lr)
    student, optimizer, train_loader, val_loader = accelerator.prepare(student, optimizer, train_loader, val_loader)
    raw_student = accelerator.unwrap_model(student)

    batches_per_epoch = len(train_loader)                       # per process, after sharding
    steps_per_epoch = max(1, batches_per_epoch // opt.grad_accum)
    total_steps = max(1, math.ceil(recipe.epochs * steps_per_epoch)) if recipe.epochs > 0 else 0   # 0: stage 1 only
    warmup = int(recipe.optim.warmup_epochs * steps_per_epoch)
    scheduler = lr_scheduler(optimizer, total_steps, warmup, 1.0 if opt.schedule == "constant" else opt.min_lr / opt.lr)
    anneal, state = AnnealSchedule(recipe.castling.anneal), TrainState()
    run_info = {"data": data.name, "train_images": len(data.train), "val_images": len(data.val), "processes": world}
    if work_dir:
        accelerator.init_trackers("castle_convert", config={"recipe": recipe.name, "epochs": recipe.epochs,
                                                            "lr": opt.lr, "batch_size": opt.batch_size})

    history: list[dict] = []
    # a headless teacher's cosine to itself is 1 by definition: not worth a pass over the data
    teacher_eval = evaluate(teacher, val_loader, accelerator, classify=True, labelled=labelled) if classify else \
        {"cosine": 1.0, "n": len(data.val)}
    # the student as stage 2 starts it: after stage 1, at the schedule's first gate
    set_schedule(raw_student, *anneal.at(0.0))
    start_eval = evaluate(student, val_loader, accelerator, classify=classify, reference=teacher,
                          labelled=labelled) \
        if not (resume and ckpt_dir.is_dir()) else {}
    accelerator.print(f"teacher {_fmt(teacher_eval)} | student at start {_fmt(start_eval) or '(resumed)'} | "
                      f"trainable parameters {trainable / 1e6:.2f}M / {total_params / 1e6:.2f}M")
    if resume and ckpt_dir.is_dir():             # after the evaluations: restores the RNG states too
        record = checkpoint.load(ckpt_dir, accelerator, model=raw_student, optimizer=optimizer, run_info=run_info)
        state.step = record["step"]
        anneal.load_state_dict({"epoch": record["anneal_epoch"]})
        scheduler.last_epoch = state.step                # the lr itself is in the optimizer's param groups
        scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
        accelerator.print(f"resumed from {ckpt_dir} at step {state.step}")

    capture = blocks = None
    if recipe.distill.attn_transfer > 0:
        capture = (_OutputCapture(raw_student, _converted_paths(raw_student)),
                   _OutputCapture(teacher, _converted_paths(raw_student)))
    if recipe.distill.intermediate > 0:               # the blocks around the converted attentions
        paths = _block_paths(raw_student)
        blocks = (_OutputCapture(raw_student, paths), _OutputCapture(teacher, paths))
    local = recipe.distill.local_transfer > 0
    mix = recipe.data.mix_list()
    forms = [m for _, m in training_forms(raw_student)]        # walked once, not every step
    for m in forms:
        m.compute_transfer = local
    eval_steps = max(1, round(recipe.eval_every * steps_per_epoch))
    bar = None
    if progress and accelerator.is_local_main_process:
        from tqdm.auto import tqdm
        bar = tqdm(total=total_steps, initial=state.step, desc="distill", dynamic_ncols=True)
    t_start, images_seen, t_window, img_window = time.time(), 0, time.time(), 0
    micro = state.step * opt.grad_accum
    try:
        while state.step < total_steps:
            epoch_idx = micro // batches_per_epoch
            train_loader.set_epoch(epoch_idx)
            if hasattr(data.train, "set_epoch"):
                data.train.set_epoch(epoch_idx)
            skip = micro % batches_per_epoch
            loader = accelerator.skip_first_batches(train_loader, skip) if skip else train_loader
            for images, labels in loader:
                images = cast_inputs(teacher, images)            # an fp16/bf16 teacher (and student) takes its dtype
                if mix:                                          # data.mix_resolutions: this step's size
                    images = resize_batch(images, mix[micro % len(mix)])
                g, tau = anneal.update(micro / batches_per_epoch)
                set_schedule(raw_student, g, tau)
                with accelerator.accumulate(student):
                    for c in (capture or ()) + (blocks or ()):
                        c.take()                  # nothing left over from an evaluation's forwards
                    with torch.no_grad(), accelerator.autocast():
                        t_out = teacher(images)
                    with accelerator.autocast():
                        s_out = student(images)
                    loss, parts = _loss(recipe, s_out, t_out, labels, classify, capture, blocks)
                    if local:
                        lt = torch.stack([m.last_transfer_loss for m in forms]).mean()
                        loss = loss + recipe.distill.local_transfer * lt
                        parts["local_transfer"] = lt.item()
                    _check_finite(loss, accelerator, state.step + 1, recipe, ckpt_dir)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and opt.clip_grad:
                        accelerator.clip_grad_norm_(student.parameters(), opt.clip_grad)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                micro += 1
                images_seen += images.shape[0] * world
                img_window += images.shape[0] * world
                if not accelerator.sync_gradients:
                    continue
                scheduler.step()
                state.step += 1
                if state.step % recipe.log_every == 0 or state.step == total_steps:
                    now = time.time()
                    row = {"step": state.step, "epoch": micro / batches_per_epoch, "loss": loss.item(),
                           **parts, "gate": g, "threshold": tau, "mask_density": _mean_mask_density(raw_student),
                           "lr": scheduler.get_last_lr()[0], "img_per_s": img_window / max(now - t_window, 1e-9)}
                    t_window, img_window = now, 0
                    history.append(row)
                    accelerator.log({f"train/{k}": v for k, v in row.items() if k != "step"}, step=state.step)
                    if bar:
                        bar.set_postfix(loss=f"{row['loss']:.4f}", g=f"{g:.3f}", mask=f"{row['mask_density']:.2f}",
                                        lr=f"{row['lr']:.2e}", img_s=f"{row['img_per_s']:.0f}")
                if bar:
                    bar.update(1)
                if ckpt_dir and state.step % recipe.save_every == 0 and state.step < total_steps:
                    checkpoint.save(ckpt_dir, accelerator, model=raw_student, optimizer=optimizer, step=state.step,
                                    anneal_epoch=anneal.epoch, recipe_dict=recipe.to_dict(), run_info=run_info)
                if state.step % eval_steps == 0 and state.step < total_steps:
                    ev = evaluate(student, val_loader, accelerator, classify=classify, reference=teacher,
                                  labelled=labelled)
                    accelerator.log({f"eval/student_{k}": v for k, v in ev.items()}, step=state.step)
                    history.append({"step": state.step, "eval": ev, "gate": g})
                    accelerator.print(f"step {state.step}: student (g={g:.3f}) {_fmt(ev)}")
                if on_step:
                    on_step(state.step)
                if state.step >= total_steps:
                    break
    finally:
        if bar:
            bar.close()
        for c in (capture or ()) + (blocks or ()):
            c.remove()
    wall = time.time() - t_start

    for m in forms:
        m.compute_transfer, m.last_transfer_loss = False, None
    # Final: the training form at g = 0, then the finalized (inference) form; the two must agree. The student
    # comes out of Accelerate's wrappers completely (mixed precision puts an autocast wrapper on its forward,
    # which finalize's copy would keep); both forms run in the run's precision (finalize's parity check too).
    raw_student = _unwrap(student)
    set_schedule(raw_student, 0.0, 0.0)
    train_form_eval = evaluate(student, val_loader, accelerator, classify=classify, reference=teacher,
                               labelled=labelled)
    with accelerator.autocast():
        final = finalize(raw_student, force=True)  # the loop ran the anneal and ends at g = 0 itself
    final_eval = evaluate(final, val_loader, accelerator, classify=classify, reference=teacher,
                          labelled=labelled)
    accelerator.log({f"eval/final_{k}": v for k, v in final_eval.items()}, step=state.step)
    for tracker in accelerator.trackers:          # not end_training(): it tears down the process group
        tracker.finish()
    teacher.train(teacher_was_training)
    key = ("top1" if labelled else "agree") if classify else "cosine"
    # fp32: the same predictions; a 16-bit run may flip a near-tie (an image or two, or 1% of them)
    exact = accelerator.mixed_precision == "no" and next(raw_student.parameters()).dtype == torch.float32
    n = max(1, train_form_eval.get("n", 1))
    tol = (0.1 if exact else max(1.0, 200.0 / n)) if classify else (1e-3 if exact else 1e-2)
    if abs(train_form_eval[key] - final_eval[key]) > tol:
        raise RuntimeError(f"finalized student disagrees with its training form at g=0: "
                           f"{final_eval[key]:.3f} vs {train_form_eval[key]:.3f} ({key})")
    return DistillResult(student=final.cpu(), teacher_eval=teacher_eval, student_start_eval=start_eval,
                         student_train_form_eval=train_form_eval, student_final_eval=final_eval,
                         steps=state.step, epochs=micro / batches_per_epoch, wall_time_s=wall,
                         images_per_s=images_seen / max(wall, 1e-9), history=history,
                         transfer=(stage1 or {}).get("transfer"), kept_softmax=kept_softmax)


STAGE1_DIR, STAGE1_WEIGHTS, STAGE1_REPORT = checkpoint.STAGE1_DIR, checkpoint.STAGE1_WEIGHTS, checkpoint.STAGE1_REPORT


def run_stage1(teacher: nn.Module, student: nn.Module, data: DataBundle, recipe: Recipe, accelerator,
               work_dir: Optional[Path], *, resume: bool = False, progress: bool = True) -> Optional[dict]:
    """Stage 1 (attention transfer) and the hybrid choice, before the end-to-end loop.

    Explicit ``castling.keep_softmax`` indices put the teacher's softmax back at those layers (if the
    student was converted without them); ``auto:K`` after stage 1, at the K layers with the largest
    stage-1 error. The student after stage 1 and the report are written to ``work_dir/stage1/``: a
    resumed run loads them instead of redoing stage 1 (a run killed during stage 1 redoes it).
    Returns ``{"transfer": TransferResult dict or None, "kept_softmax": [paths]}`` or None when
    there is nothing to do.
    """
    import json

    from safetensors.torch import load_file, save_file

    from castle_convert.convert import kept_softmax_paths, restore_softmax
    from castle_convert.distill.transfer import attention_transfer

    tr = recipe.transfer
    indices, auto_k = recipe.castling.keep_softmax_spec()
    converted = set(_converted_paths(student))
    explicit = kept_softmax_paths(teacher, indices)
    if not tr.steps and not tr.load_from and not indices:
        return None
    folder = work_dir / STAGE1_DIR if work_dir else None
    if any(p in converted for p in explicit):        # cc.distill of a student converted without them
        restore_softmax(student, teacher, [p for p in explicit if p in converted])
    if resume and folder and (folder / STAGE1_REPORT).is_file():
        report = _load_stage1(folder, student, accelerator, "--resume: the stage-1 checkpoint in")
        _restore_stage1_rng(folder, accelerator)       # the RNG states as stage 1 ended: bit-identical from here
        accelerator.print(f"stage 1: loaded from {folder} (resumed)")
        errors = (report.get("transfer") or {}).get("errors")
        kept = list(explicit) + _auto_keep(student, teacher, errors, auto_k, explicit, accelerator)
        return {**report, "kept_softmax": kept}
    if resume and folder and (folder / checkpoint.STAGE1_STARTED).is_file():
        accelerator.print("stage 1 did not finish before the interruption: redoing it")
    result = None
    if tr.load_from:                                  # an earlier run's stage 1, reused (recorded as such)
        source = Path(tr.load_from).expanduser()
        loaded = _load_stage1(source, student, accelerator, "transfer.load_from:")
        transfer = {**(loaded.get("transfer") or {}), "loaded_from": str(source)}
        accelerator.print(f"stage 1: loaded from {source} (transfer.load_from), not recomputed")
    elif tr.steps:
        if folder and accelerator.is_main_process:    # a kill from here on: --resume redoes stage 1
            with checkpoint.writing(folder / checkpoint.STAGE1_STARTED, [], "nothing is lost: stage 1 starts over"):
                folder.mkdir(parents=True, exist_ok=True)
                (folder / checkpoint.STAGE1_STARTED).write_text(json.dumps({"recipe": recipe.to_dict()}, indent=1))
        world, rank = accelerator.num_processes, accelerator.process_index
        shard = data.train if world == 1 else torch.utils.data.Subset(data.train, range(rank, len(data.train), world))
        workers = 0 if isinstance(data.train, Materialized) else recipe.data.workers
        loader = DataLoader(shard, batch_size=tr.batch_size, shuffle=True, drop_last=True, num_workers=workers,
                            generator=torch.Generator().manual_seed(recipe.seed + 17))
        if len(loader) == 0:
            raise DataError(f"dataset '{data.name}' has fewer training images than one stage-1 batch "
                            f"(transfer.batch_size={tr.batch_size})")
        held_out = [images for images, _ in itertools.islice(DataLoader(data.val, batch_size=tr.batch_size), 2)]
        result = attention_transfer(teacher, student, loader, steps=tr.steps, lr=tr.lr, train=tr.train,
                                    weight_decay=tr.weight_decay, reuse=tr.reuse, eval_batches=held_out,
                                    accelerator=accelerator, progress=progress,
                                    resolutions=recipe.data.mix_list() or None)
        accelerator.print("stage 1: per-layer normalized error (held-out images, gate 0)\n" + result.format() +
                          f"\nstage 1 took {result.wall_time_s:.0f}s ({result.images} images)")
    else:
        transfer = None
    if not tr.load_from:
        transfer = result.to_dict() if result else None
    report = {"transfer": transfer, "recipe": recipe.to_dict()}
    if folder:                                      # before the auto:K choice: a resume (or another K) redoes it
        rng = folder / f"rng_{accelerator.process_index}.json"
        partial = [folder / (STAGE1_WEIGHTS + ".tmp"), folder / STAGE1_WEIGHTS, folder / STAGE1_REPORT, rng]
        with checkpoint.writing(folder, partial, "stage 1 is redone then"):
            if accelerator.is_main_process:
                folder.mkdir(parents=True, exist_ok=True)
            accelerator.wait_for_everyone()
            checkpoint.write_rng(folder, accelerator.process_index)  # every process's RNGs as stage 1 ends
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                save_file({k: v.detach().contiguous().cpu() for k, v in student.state_dict().items()},
                          str(folder / (STAGE1_WEIGHTS + ".tmp")))
                (folder / (STAGE1_WEIGHTS + ".tmp")).replace(folder / STAGE1_WEIGHTS)
                (folder / STAGE1_REPORT).write_text(json.dumps(report, indent=2))      # written last: marks it done
    accelerator.wait_for_everyone()
    kept = list(explicit) + _auto_keep(student, teacher, (transfer or {}).get("errors"), auto_k, explicit,
                                       accelerator)
    return {**report, "kept_softmax": kept}


def _load_stage1(folder: Path, student: nn.Module, accelerator, what: str) -> dict:
    """The stage1.json record of ``folder`` after loading its student into ``student`` (one-line errors)."""
    import json

    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        report = json.loads((folder / STAGE1_REPORT).read_text())
        student.load_state_dict(load_file(str(folder / STAGE1_WEIGHTS), device=str(accelerator.device)))
    except (RuntimeError, OSError, ValueError, SafetensorError) as e:
        raise ResumeError(f"{what} {folder} holds no stage-1 result that fits this student ({error_line(e, 160)}): it must be "
                          "the stage1/ folder of a run with the same model and castling section; or start over with "
                          "--overwrite") from None
    if not isinstance(report, dict):
        raise ResumeError(f"{what} {folder / STAGE1_REPORT} is not a stage-1 record: start over with --overwrite")
    return report


def _restore_stage1_rng(folder: Path, accelerator) -> None:
    """The RNG states stage 1 ended with (``rng_<rank>.json``; a record from before they were kept has none)."""
    if not (folder / f"rng_{accelerator.process_index}.json").is_file():
        return
    try:
        checkpoint.read_rng(folder, accelerator.process_index)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        raise ResumeError(f"--resume: the stage-1 checkpoint in {folder} is damaged ({error_line(e, 160)}): start "
                          "over with --overwrite") from None


def _auto_keep(student: nn.Module, teacher: nn.Module, errors: Optional[dict], k: int, explicit: list[str],
               accelerator) -> list[str]:
    """``keep_softmax: auto:K``: restore softmax at the K converted layers with the largest stage-1 error."""
    from castle_convert.convert import restore_softmax
    if not k:
        return []
    if not errors:
        raise ResumeError("keep_softmax auto:K needs the stage-1 errors, and this run has none (transfer.steps: 0)")
    ranked = [p for p in sorted(errors, key=errors.get, reverse=True) if p not in explicit]
    auto = ranked[:k]
    restore_softmax(student, teacher, auto)
    accelerator.print(f"keep_softmax auto:{k}: {', '.join(auto)} stay softmax (largest stage-1 errors)")
    return auto


def _block_paths(student: nn.Module) -> list[str]:
    """The blocks (parents) of the converted attentions, in model order: ``blocks.3`` for ``blocks.3.attn``."""
    out: list[str] = []
    for path in _converted_paths(student):
        parent = path.rsplit(".", 1)[0] if "." in path else path
        if parent not in out:
            out.append(parent)
    return out


def _loss(recipe: Recipe, s_out, t_out, labels, classify: bool, capture, blocks=None) -> tuple[torch.Tensor, dict]:
    d = recipe.distill
    parts: dict[str, float] = {}
    if classify:
        s_logits, t_logits = primary_output(s_out), primary_output(t_out)
        kd = losses.soft_kd(s_logits, t_logits, d.temperature) if d.loss == "soft" else losses.hard_kd(s_logits, t_logits)
        loss = d.alpha * kd
        parts["kd"] = kd.item()
        if d.alpha < 1.0:
            ce = torch.nn.functional.cross_entropy(s_logits.float(), labels)
            loss = loss + (1.0 - d.alpha) * ce
            parts["ce"] = ce.item()
    elif d.feature_target == "tokens":
        s_feat, t_feat = primary_output(s_out), primary_output(t_out)      # (B, N, C), or (B, C) pooled
        loss = losses.feature_loss(s_feat.flatten(0, -2), t_feat.flatten(0, -2), d.feature_loss)
        parts["feature"] = loss.item()
    else:
        loss = losses.feature_loss(embeddings(s_out), embeddings(t_out), d.feature_loss)
        parts["feature"] = loss.item()
    if capture is not None:
        s_cap, t_cap = capture
        at = losses.attention_transfer(s_cap.take(), t_cap.take())
        loss = loss + d.attn_transfer * at
        parts["attn_transfer"] = at.item()
    if blocks is not None:
        s_blk, t_blk = blocks
        inter = losses.intermediate_features(s_blk.take(), t_blk.take())
        loss = loss + d.intermediate * inter
        parts["intermediate"] = inter.item()
    return loss, parts


def _check_finite(loss: torch.Tensor, accelerator, step: int, recipe: Recipe, ckpt_dir: Optional[Path]) -> None:
    """Stop at the first non-finite loss (every process agrees), before it reaches the weights."""
    if losses.is_finite(loss, accelerator):
        return
    kept = (f"; the last checkpoint (before the divergence) is kept in {ckpt_dir}" if ckpt_dir and ckpt_dir.is_dir()
            else "")
    raise DivergenceError(f"training diverged at step {step}: the loss is {loss.item()} with optim.lr="
                          f"{recipe.optim.lr:g}: start again with a lower learning rate (e.g. --overwrite --set "
                          f"optim.lr={recipe.optim.lr / 10:g}) or a smaller optim.clip_grad{kept}")


def _fmt(ev: dict) -> str:
    if not ev:
        return ""
    if "top1" in ev:
        return f"top-1 {ev['top1']:.2f}%" + (f" (agrees with teacher {ev['agree']:.2f}%)" if "agree" in ev else "")
    if "agree" in ev:
        return f"agrees with teacher {ev['agree']:.2f}%"
    return f"cosine {ev['cosine']:.4f}"
