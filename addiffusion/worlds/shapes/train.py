"""Training of the shapes world's models, in resumable phases.

1. VAE (AutoencoderKL, 32x32x3 <-> 8x8x4): L1 + MSE reconstruction + a tiny KL term; then the
   latent scaling factor is set to 1 / std of the latents (SD's convention); then the decoder alone
   is fine-tuned with a decaying learning rate (the encoder, hence the latents, stay fixed).
2. CLIP (open_clip ViT + text transformer): symmetric InfoNCE (open_clip's ``ClipLoss``) on
   renders + captions drawn on the fly, with light pixel noise so generated images score sensibly.
3. UNet + text encoder: v-prediction with min-SNR-5 weighting on cached VAE latents of
   ``n_train_scenes`` train-split scenes; captions dropped to "" with ``cond_dropout`` for
   classifier-free guidance; constant learning rate, then a linear decay over the last
   ``unet_decay_steps``; EMA weights are what gets exported.
4. Preview decoder: an ``AutoencoderTiny`` distilled from the exported pipeline's VAE, for cheap
   per-step observations (:mod:`addiffusion.worlds.shapes.preview`).

Every phase checkpoints (model + optimizer + step) every ``checkpoint_minutes`` into
``<ckpt_dir>/<phase>.pt`` and resumes from it; batches are a pure function of (seed, phase, step), so
a resumed run sees the same data. The pipeline is exported (``save_pretrained``) at each UNet
checkpoint, so the newest export is always usable.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline
from diffusers.training_utils import EMAModel, compute_snr
from tqdm import tqdm
from transformers import CLIPTokenizer

from addiffusion.diffusion.backbone import resolve_device
from addiffusion.worlds.shapes.captions import CATEGORIES, caption_of, sample_scene
from addiffusion.worlds.shapes.config import ShapesConfig
from addiffusion.worlds.shapes.models import (
    CONTEXT_LENGTH,
    ModelSizes,
    build_clip,
    build_pipeline,
    save_clip,
    write_tokenizer,
)
from addiffusion.worlds.shapes.preview import save_preview, train_preview
from addiffusion.worlds.shapes.scenes import render

_PHASE_ID = {"vae": 1, "clip": 2, "unet": 3, "data": 4, "decoder": 5, "preview": 6}


def scene_batch(seed: int, phase: str, step: int, n: int) -> tuple[np.ndarray, list[str]]:
    """``n`` train-split renders ``(n, 32, 32, 3)`` uint8 and captions; a pure function of its args."""
    rng = np.random.default_rng([seed, _PHASE_ID[phase], step])
    scenes = [sample_scene(rng, CATEGORIES[int(rng.integers(3))], "train") for _ in range(n)]
    return np.stack([render(s) for s in scenes]), [caption_of(s.spec) for s in scenes]


def to_pixels(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """``(B, H, W, 3)`` uint8 -> ``(B, 3, H, W)`` float32 in [-1, 1] (the VAE's and CLIP's range)."""
    x = torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def tokenize(tokenizer: CLIPTokenizer, captions: list[str], device: torch.device) -> torch.Tensor:
    """``(B, CONTEXT_LENGTH)`` int64 ids, padded exactly as StableDiffusionPipeline pads prompts."""
    out = tokenizer(
        captions,
        padding="max_length",
        max_length=CONTEXT_LENGTH,
        truncation=True,
        return_tensors="pt",
    )
    return out.input_ids.to(device)


class _Checkpoint:
    """Time-based checkpointing of one phase to ``<dir>/<phase>.pt`` (only files this run wrote).

    ``parts`` names the phase's stateful objects (models, optimizer, schedulers, EMA: anything with
    ``state_dict``/``load_state_dict``); the file holds each one's state under its name plus the step.
    """

    def __init__(self, ckpt_dir: Path, phase: str, minutes: float, parts: dict[str, Any]) -> None:
        self.path = Path(ckpt_dir) / f"{phase}.pt"
        self.every = minutes * 60.0
        self.last = time.monotonic()
        self.parts = parts

    def restore(self) -> int:
        """Load the parts' states if a checkpoint exists; the step to resume at (0 if none)."""
        if not self.path.exists():
            return 0
        state = torch.load(self.path, map_location="cpu", weights_only=True)
        for name, part in self.parts.items():
            part.load_state_dict(state[name])
        return int(state["step"])

    def due(self) -> bool:
        return time.monotonic() - self.last >= self.every

    def save(self, step: int) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        state = {"step": step, **{name: part.state_dict() for name, part in self.parts.items()}}
        torch.save(state, tmp)
        tmp.replace(self.path)  # atomic: a killed run never leaves half a checkpoint
        self.last = time.monotonic()


def train_vae(
    pipe: StableDiffusionPipeline, cfg: ShapesConfig, ckpt_dir: Path, device: torch.device
) -> None:
    vae = pipe.vae
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr)
    ck = _Checkpoint(ckpt_dir, "vae", cfg.checkpoint_minutes, {"model": vae, "opt": opt})
    start = ck.restore()
    vae.train()
    bar = tqdm(
        range(start, cfg.vae_steps), desc="vae", initial=start, total=cfg.vae_steps, mininterval=10
    )
    for step in bar:
        x = to_pixels(scene_batch(cfg.seed, "vae", step, cfg.vae_batch)[0], device)
        post = vae.encode(x).latent_dist
        recon = vae.decode(post.sample()).sample
        rec = F.l1_loss(recon, x) + F.mse_loss(recon, x)
        loss = rec + cfg.vae_kl_weight * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(rec=f"{rec.item():.4f}", refresh=False)
        if ck.due() or step + 1 == cfg.vae_steps:
            ck.save(step + 1)
    vae.eval()
    with torch.no_grad():
        x = to_pixels(scene_batch(cfg.seed, "data", 10**9, 1024)[0], device)
        std = float(vae.encode(x).latent_dist.mean.std())
    vae.register_to_config(scaling_factor=1.0 / std)


def train_decoder(
    pipe: StableDiffusionPipeline, cfg: ShapesConfig, ckpt_dir: Path, device: torch.device
) -> None:
    """Fine-tune the VAE decoder alone (encoder frozen, so latents do not move) with a cosine
    learning rate: crisper silhouettes than the joint phase reaches, as SD's ft-MSE decoder."""
    vae = pipe.vae
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.decoder_lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(cfg.decoder_steps, 1))
    parts = {"model": vae, "opt": opt, "sched": sched}
    ck = _Checkpoint(ckpt_dir, "decoder", cfg.checkpoint_minutes, parts)
    start = ck.restore()
    vae.decoder.train()
    bar = tqdm(
        range(start, cfg.decoder_steps),
        desc="decoder",
        initial=start,
        total=cfg.decoder_steps,
        mininterval=10,
    )
    for step in bar:
        x = to_pixels(scene_batch(cfg.seed, "decoder", step, cfg.vae_batch)[0], device)
        with torch.no_grad():
            z = vae.encode(x).latent_dist.sample()
        recon = vae.decode(z).sample
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(rec=f"{loss.item():.4f}", refresh=False)
        if ck.due() or step + 1 == cfg.decoder_steps:
            ck.save(step + 1)
    vae.eval()


def train_clip(
    model: open_clip.CLIP,
    tokenizer: CLIPTokenizer,
    cfg: ShapesConfig,
    ckpt_dir: Path,
    device: torch.device,
) -> None:
    loss_fn = open_clip.ClipLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.clip_lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, cfg.clip_lr, total_steps=max(cfg.clip_steps, 1)
    )
    parts = {"model": model, "opt": opt, "sched": sched}
    ck = _Checkpoint(ckpt_dir, "clip", cfg.checkpoint_minutes, parts)
    start = ck.restore()
    model.train()
    bar = tqdm(
        range(start, cfg.clip_steps),
        desc="clip",
        initial=start,
        total=cfg.clip_steps,
        mininterval=10,
    )
    for step in bar:
        images, captions = scene_batch(cfg.seed, "clip", step, cfg.clip_batch)
        x = to_pixels(images, device)
        # Pixel noise of random strength: generated images are not as clean as renders.
        x = x + torch.randn_like(x) * torch.rand(x.shape[0], 1, 1, 1, device=device) * 0.2
        image_features, text_features, logit_scale = model(
            x, tokenize(tokenizer, captions, device)
        )[:3]
        loss = loss_fn(image_features, text_features, logit_scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        if ck.due() or step + 1 == cfg.clip_steps:
            ck.save(step + 1)
    model.eval()


@torch.no_grad()
def encode_dataset(
    pipe: StableDiffusionPipeline, cfg: ShapesConfig, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled latents ``(N, 4, 8, 8)`` float32 and token ids ``(N, CONTEXT_LENGTH)`` of N scenes."""
    latents, ids = [], []
    for chunk in tqdm(range(0, cfg.n_train_scenes, 256), desc="encode", mininterval=10):
        n = min(256, cfg.n_train_scenes - chunk)
        images, captions = scene_batch(cfg.seed, "data", chunk, n)
        z = pipe.vae.encode(to_pixels(images, device)).latent_dist.mean
        latents.append(z * pipe.vae.config.scaling_factor)
        ids.append(tokenize(pipe.tokenizer, captions, device))
    return torch.cat(latents), torch.cat(ids)


def unet_lr_at(cfg: ShapesConfig, step: int) -> float:
    """Constant ``unet_lr``, then linear decay to 0 over the last ``unet_decay_steps`` steps.

    A pure function of the step, so a resumed run follows the same schedule, and a run that was
    resumed with more ``unet_steps`` equals a fresh one while the decay has not started.
    """
    left = cfg.unet_steps - step
    if left >= cfg.unet_decay_steps:
        return cfg.unet_lr
    return cfg.unet_lr * left / cfg.unet_decay_steps


def train_unet(
    pipe: StableDiffusionPipeline,
    cfg: ShapesConfig,
    ckpt_dir: Path,
    out_dir: Path,
    device: torch.device,
    deadline: float | None,
) -> None:
    unet, te, sched = pipe.unet, pipe.text_encoder, pipe.scheduler
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=0.01)
    ema = EMAModel(params, decay=cfg.ema_decay, use_ema_warmup=True, power=0.75)
    parts = {"unet": unet, "text_encoder": te, "opt": opt, "ema": ema}
    ck = _Checkpoint(ckpt_dir, "unet", cfg.checkpoint_minutes, parts)
    start = ck.restore()
    latents, ids = encode_dataset(pipe, cfg, device)
    empty = tokenize(pipe.tokenizer, [""], device)
    unet.train()
    te.train()

    def export_and_save(step: int) -> None:
        ck.save(step)
        ema.store(params)
        ema.copy_to(params)
        pipe.save_pretrained(out_dir / "pipeline")
        ema.restore(params)

    bar = tqdm(
        range(start, cfg.unet_steps),
        desc="unet",
        initial=start,
        total=cfg.unet_steps,
        mininterval=10,
    )
    step = start
    for step in bar:
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        idx = torch.randint(0, latents.shape[0], (cfg.unet_batch,), generator=g)
        x0, cond = latents[idx], ids[idx].clone()
        cond[torch.rand(cfg.unet_batch, generator=g) < cfg.cond_dropout] = empty
        noise = torch.randn(x0.shape, generator=g).to(device)
        t = torch.randint(0, sched.config.num_train_timesteps, (cfg.unet_batch,), generator=g).to(
            device
        )
        for group in opt.param_groups:
            group["lr"] = unet_lr_at(cfg, step)
        pred = unet(sched.add_noise(x0, noise, t), t, te(cond)[0]).sample
        target = sched.get_velocity(x0, noise, t)
        # min-SNR-5 weighting for v-prediction (Hang et al. 2023): faster, steadier convergence.
        snr = compute_snr(sched, t)
        weight = torch.clamp(snr, max=5.0) / (snr + 1.0)
        loss = (weight * F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.step(params)
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        if ck.due():
            export_and_save(step + 1)
        if deadline is not None and time.monotonic() > deadline:
            bar.write(f"unet: time budget reached at step {step + 1}")
            break
    export_and_save(step + 1 if cfg.unet_steps > start else start)
    unet.eval()
    te.eval()


def train(
    cfg: ShapesConfig,
    out_dir: Path,
    max_minutes: float | None = None,
    sizes: ModelSizes | None = None,
    ckpt_dir: Path | None = None,
) -> None:
    """Train all phases into ``out_dir/{pipeline,clip,preview}``; checkpoints in ``ckpt_dir``
    (default ``out_dir/checkpoints``).

    ``max_minutes`` bounds the whole run: the UNet phase stops (and exports) when it is reached.
    """
    sizes = sizes or ModelSizes()
    deadline = None if max_minutes is None else time.monotonic() + max_minutes * 60.0
    device = resolve_device(cfg.device)
    out_dir = Path(out_dir)
    ckpt_dir = out_dir / "checkpoints" if ckpt_dir is None else Path(ckpt_dir)
    tokenizer = write_tokenizer(ckpt_dir / "tokenizer_src")
    pipe = build_pipeline(tokenizer, sizes, cfg.seed).to(device)
    pipe.set_progress_bar_config(disable=True)
    train_vae(pipe, cfg, ckpt_dir, device)
    train_decoder(pipe, cfg, ckpt_dir, device)
    clip = build_clip(len(tokenizer), sizes, cfg.seed).to(device)
    train_clip(clip, tokenizer, cfg, ckpt_dir, device)
    save_clip(clip, tokenizer, sizes, out_dir / "clip")
    train_unet(pipe, cfg, ckpt_dir, out_dir, device, deadline)
    exported = StableDiffusionPipeline.from_pretrained(out_dir / "pipeline").to(device)  # EMA
    save_preview(train_preview(exported, cfg, ckpt_dir, device), out_dir / "preview")


def train_preview_only(
    cfg: ShapesConfig, pipeline: Path, out_dir: Path, ckpt_dir: Path | None = None
) -> Path:
    """The preview phase alone, on the trained pipeline folder ``pipeline``: writes
    ``out_dir/preview`` (checkpoints in ``ckpt_dir``, default ``out_dir/checkpoints``)."""
    pipeline = Path(pipeline)
    if not (pipeline / "model_index.json").is_file():
        raise FileNotFoundError(
            f"{pipeline / 'model_index.json'} not found: --pipeline must be a trained shapes "
            "pipeline folder (assets/shapes/pipeline, or a `shapes train --out`/pipeline)"
        )
    device = resolve_device(cfg.device)
    pipe = StableDiffusionPipeline.from_pretrained(pipeline).to(device)
    pipe.set_progress_bar_config(disable=True)
    ckpt_dir = Path(out_dir) / "checkpoints" if ckpt_dir is None else Path(ckpt_dir)
    return save_preview(train_preview(pipe, cfg, ckpt_dir, device), Path(out_dir) / "preview")
