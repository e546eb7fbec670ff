"""On-policy distillation training loop (accelerate).

Each optimizer step:

1. rollout: ``batch_size`` train prompts (one fresh seed each) are sampled by the *current*
   student at the pair's ``n_steps`` timesteps (:func:`addiffusion.distill.pair.rollout`);
2. grading: the teacher predicts at every state the student visited, at the same timestep;
3. update: loss ``kl_weight(step) * KL + mse_weight * MSE`` (:mod:`addiffusion.distill.losses`),
   backward through the student's predictions, ``grad_accum_steps`` micro-batches per step,
   gradient clipping at ``max_grad_norm``, AdamW, learning-rate schedule with warm-up. The KL
   weight is 0 for ``kl_start`` steps (the MSE auxiliary alone), then ramps up over ``kl_ramp``.

The first ``offline_steps`` steps may instead train on teacher trajectories read from the
trajectory store (:mod:`addiffusion.distill.teacher_store`): the teacher's own states, graded by
its recorded predictions (an offline warm-start).

Randomness is a function of ``(seed, step, micro-batch)`` (prompt choice, noise), and checkpoints
(``accelerator.save_state``: weights, optimizer, schedule, RNG) are taken every
``checkpoint_every`` steps, so a run resumed from a checkpoint ends with the same weights as an
uninterrupted one. ``metrics.jsonl`` has one line per step: step, total, kl, mse, lr, grad_norm,
kl_weight, phase, kl_per_timestep (on-policy steps), and every ``monitor_every`` steps the final-latent and image MSE between the
student's and the teacher's own samples from the same noise.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from addiffusion.collect.prompts import PromptRecord, load_prompts
from addiffusion.config import UserError
from addiffusion.diffusion import backbone
from addiffusion.distill import losses as L
from addiffusion.distill.config import EVAL_KEYS, DistillConfig
from addiffusion.distill.pair import (
    Conditioning,
    Pair,
    decode,
    draw_noise,
    encode,
    guided,
    load_pair,
    rollout,
    sample,
)

CSV_COLUMNS = ("step", "total", "kl", "mse", "lr", "grad_norm", "kl_weight")


@dataclass(frozen=True)
class TrainSummary:
    steps: int
    resumed_from: int
    seconds: float
    last: dict[str, Any]


def mixed_precision(setting: str, device: torch.device) -> str:
    """accelerate's ``mixed_precision`` for ``setting`` on ``device`` (auto: bf16 on CUDA that
    has it, else no)."""
    if setting != "auto":
        if setting == "fp16" and device.type == "cpu":
            raise UserError("distill.mixed_precision fp16 needs a CUDA device; use bf16 or no")
        return setting
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


def train_config_dict(cfg: DistillConfig) -> dict[str, Any]:
    """The settings that define a training run (a checkpoint resumes only under the same)."""
    data = dataclasses.asdict(cfg)
    for key in (
        *EVAL_KEYS,
        "scorer",
        "device",
        "mixed_precision",
        "checkpoint_every",
        "monitor_every",
    ):
        data.pop(key)
    return json.loads(json.dumps(data))


def split_prompts(cfg: DistillConfig, split: str) -> list[PromptRecord]:
    """The ``split`` (``train`` or ``heldout``) prompts of ``distill.prompts``."""
    prompts = [
        p
        for p in load_prompts(cfg.prompts, cfg.n_prompts, cfg.heldout_fraction, cfg.seed)
        if p.split == split
    ]
    if not prompts:
        raise UserError(f"distill.prompts {cfg.prompts!r} has no {split} prompts")
    return prompts


def train_prompts(cfg: DistillConfig) -> list[PromptRecord]:
    return split_prompts(cfg, "train")


def _batch(
    cfg: DistillConfig, prompts: list[PromptRecord], step: int, micro: int, rank: int
) -> tuple[list[str], list[int], np.random.Generator]:
    """Prompts, noise seeds and a generator of one micro-batch: a function of (seed, step,
    micro-batch, process rank) only, so that a resumed run draws what the uninterrupted one
    did, and processes draw different batches."""
    rng = np.random.default_rng([cfg.seed, step, micro, rank, 0xD157])
    pick = rng.choice(len(prompts), size=cfg.batch_size, replace=len(prompts) < cfg.batch_size)
    seeds = rng.integers(0, 2**31 - 1, size=cfg.batch_size)
    return [prompts[int(k)].text for k in pick], [int(s) for s in seeds], rng


def _checkpoints(out: Path) -> Path:
    return out / "checkpoints"


def latest_checkpoint(out: Path) -> tuple[Path, int] | None:
    pointer = _checkpoints(out) / "latest.json"
    if not pointer.is_file():
        return None
    data = json.loads(pointer.read_text())
    path = _checkpoints(out) / data["name"]
    return (path, int(data["step"])) if path.is_dir() else None


def _save_checkpoint(accelerator: Accelerator, out: Path, step: int) -> None:
    root = _checkpoints(out)
    name = f"step-{step:06d}"
    accelerator.save_state(str(root / name))
    if not accelerator.is_main_process:
        return
    tmp = root / "latest.json.tmp"
    tmp.write_text(json.dumps({"name": name, "step": step}))
    tmp.replace(root / "latest.json")
    for old in root.glob("step-*"):
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)


def _read_metrics(path: Path, upto: int) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["step"] <= upto]


def _monitor(
    pair: Pair, cond: Conditioning, noise: torch.Tensor, student_final: torch.Tensor
) -> dict[str, float]:
    teacher_final = sample(pair, "teacher", cond, noise)
    return {
        "final_latent_mse": L.mse(student_final, teacher_final),
        "image_mse": L.mse(decode(pair, student_final), decode(pair, teacher_final)),
    }


def train(
    cfg: DistillConfig, out: Path, progress: bool = True, stop_at: int | None = None
) -> TrainSummary:
    """Distil ``cfg.teacher`` into the student (:func:`_train`), then drop accelerate's
    process-wide state (its singletons would refuse another mixed precision in the same process:
    tests, notebooks)."""
    try:
        return _train(cfg, out, progress, stop_at)
    finally:
        AcceleratorState._reset_state()
        GradientState._reset_state()


def _train(cfg: DistillConfig, out: Path, progress: bool, stop_at: int | None) -> TrainSummary:
    """Distil ``cfg.teacher`` into the student; write ``out``/{student_init, student,
    checkpoints, metrics.jsonl, training.csv, metrics.json, manifest.json}.

    Resumes from ``out``/checkpoints when it holds a run of the same settings (else
    :class:`UserError`: remove ``out`` or restore the settings). ``stop_at``: end after that many
    steps with a checkpoint, as an interrupted run would (tests)."""
    t0 = time.perf_counter()
    out = Path(out)
    device = backbone.resolve_device(cfg.device)
    mp = mixed_precision(cfg.mixed_precision, device)
    accelerator = Accelerator(
        mixed_precision=mp,
        gradient_accumulation_steps=cfg.grad_accum_steps,
        cpu=device.type == "cpu",
    )
    run_config = train_config_dict(cfg)
    manifest_path = out / "manifest.json"
    resume = latest_checkpoint(out)
    if resume is not None:
        recorded = (
            json.loads(manifest_path.read_text())["config"] if manifest_path.is_file() else {}
        )
        if recorded != run_config:
            key = next(
                k
                for k in sorted(set(recorded) | set(run_config))
                if recorded.get(k) != run_config.get(k)
            )
            raise UserError(
                f"{out} holds a distillation run with distill.{key} = {recorded.get(key)!r}, "
                f"this run has {run_config.get(key)!r}: remove {out} to start over (or restore "
                "the setting to resume)"
            )
    teacher_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mp, torch.float32)
    pair = load_pair(cfg, str(accelerator.device), teacher_dtype)
    prompts = train_prompts(cfg)
    offline = None
    if cfg.offline_steps:
        from addiffusion.distill.teacher_store import read_teacher_trajectories

        offline = read_teacher_trajectories(Path(cfg.offline_store), pair)

    model = backbone.denoiser_of(pair.student)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    lr_sched = get_scheduler(
        cfg.lr_schedule,
        optimizer,
        num_warmup_steps=cfg.lr_warmup_steps,
        num_training_steps=cfg.train_steps,
    )
    model, optimizer, lr_sched = accelerator.prepare(model, optimizer, lr_sched)

    start = 0
    if resume is not None:
        accelerator.load_state(str(resume[0]))
        start = resume[1]
    elif accelerator.is_main_process:
        if out.exists():
            for name in ("checkpoints", "student", "student_init", "metrics.jsonl"):
                path = out / name
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        out.mkdir(parents=True, exist_ok=True)
        pair.student.save_pretrained(str(out / "student_init"))  # the pre-distillation student
        manifest = {
            "config": run_config,
            "timesteps": [int(t) for t in pair.timesteps],
            "teacher": cfg.teacher,
            "student_init": cfg.student_init,
            "teacher_parameters": sum(
                p.numel() for p in backbone.denoiser_of(pair.teacher).parameters()
            ),
            "student_parameters": sum(p.numel() for p in params),
        }
        manifest_path.write_text(json.dumps(manifest, indent=2))
    accelerator.wait_for_everyone()
    # One process writes the files; the metrics are its own batches' (not all-reduced).
    rows = _read_metrics(out / "metrics.jsonl", start)
    log = (out / "metrics.jsonl").open("w") if accelerator.is_main_process else None
    for row in rows if log else ():
        log.write(json.dumps(row) + "\n")

    end = cfg.train_steps if stop_at is None else min(stop_at, cfg.train_steps)
    bar = tqdm(range(start, end), desc="distill", unit="step", disable=not progress)
    for step in bar:
        kl_w = L.kl_weight_at(step, cfg.kl_weight, cfg.kl_start, cfg.kl_ramp)
        phase = "offline" if step < cfg.offline_steps else "on-policy"
        sums = {"total": 0.0, "kl": 0.0, "mse": 0.0}
        kl_steps = torch.zeros(cfg.n_steps)  # on-policy: the KL at each timestep
        grad_norm = float("nan")
        for micro in range(cfg.grad_accum_steps):
            texts, seeds, rng = _batch(cfg, prompts, step, micro, accelerator.process_index)
            with accelerator.accumulate(model), accelerator.autocast():
                if offline is not None and phase == "offline":
                    i, states, targets, texts = offline.batch(rng, cfg.batch_size, pair.device)
                    cond = encode(pair, texts)
                    s_out = guided(
                        model,
                        pair.student,
                        pair.scheduler,
                        pair.space,
                        states,
                        i,
                        cond.student,
                        pair.guidance_scale,
                    )
                    parts = L.distill_losses(
                        pair.scheduler,
                        pair.space,
                        [states],
                        [targets],
                        [s_out],
                        cfg.kl_eta,
                        cfg.kl_var_floor,
                        indices=[i],
                    )
                else:
                    cond = encode(pair, texts)
                    noise = draw_noise(pair, seeds)
                    ro = rollout(pair, cond, noise, grad=True, student_model=model)
                    parts = L.distill_losses(
                        pair.scheduler,
                        pair.space,
                        ro.states,
                        ro.teacher,
                        ro.student,
                        cfg.kl_eta,
                        cfg.kl_var_floor,
                    )
                total = parts.total(kl_w, cfg.mse_weight)
                accelerator.backward(total)
                if accelerator.sync_gradients:
                    grad_norm = float(accelerator.clip_grad_norm_(params, cfg.max_grad_norm))
                optimizer.step()
                lr_sched.step()
                optimizer.zero_grad()
            for key, value in (("total", total), ("kl", parts.kl), ("mse", parts.mse)):
                sums[key] += float(value.detach()) / cfg.grad_accum_steps
            if phase == "on-policy":
                kl_steps += parts.kl_per_step.detach().cpu() / cfg.grad_accum_steps
        row: dict[str, Any] = {
            "step": step + 1,
            **sums,
            "lr": float(lr_sched.get_last_lr()[0]),
            "grad_norm": grad_norm,
            "kl_weight": kl_w,
            "phase": phase,
        }
        if phase == "on-policy":
            row["kl_per_timestep"] = [float(k) for k in kl_steps]
        if phase == "on-policy" and ((step + 1) % cfg.monitor_every == 0 or step + 1 == end):
            model.eval()
            row.update(_monitor(pair, cond, noise, ro.final))
            model.train()
        if log is not None:
            log.write(json.dumps(row) + "\n")
            log.flush()
        rows.append(row)
        bar.set_postfix(total=f"{row['total']:.4f}", kl=f"{row['kl']:.3f}", mse=f"{row['mse']:.4f}")
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == end:
            _save_checkpoint(accelerator, out, step + 1)
    if log is not None:
        log.close()
    if end == cfg.train_steps and accelerator.is_main_process:
        accelerator.unwrap_model(model).eval()
        pair.student.save_pretrained(str(out / "student"))
        _write_curves(out, rows)
    last = rows[-1] if rows else {}
    return TrainSummary(end, start, time.perf_counter() - t0, last)


def _write_curves(out: Path, rows: list[dict[str, Any]]) -> None:
    with (out / "training.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        for r in rows:
            w.writerow([r[c] for c in CSV_COLUMNS])
    monitored = [r for r in rows if "image_mse" in r]
    summary = {k: rows[-1][k] for k in CSV_COLUMNS if k != "lr"}
    if monitored:
        summary["first_image_mse"] = monitored[0]["image_mse"]
        summary["last_image_mse"] = monitored[-1]["image_mse"]
        summary["last_final_latent_mse"] = monitored[-1]["final_latent_mse"]
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
