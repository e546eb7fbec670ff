"""The shapes world's preview decoder: a TAESD-style ``AutoencoderTiny`` distilled from its VAE.

Per-step observations decode x̂0 at every decision point; diffusers users preview latents the
same way with ``madebyollin/taesd*`` (``AutoencoderTiny``), a decoder a fraction of the VAE's
cost. This module trains one for the shapes world, in its own seeded and resumable phase
(``addiffusion shapes train --phase preview``, or the last phase of ``shapes train``):

* inputs: the latents the sampler will ask it to decode, i.e. *scaled* latents (what the UNet
  works in; ``AutoencoderTiny``'s ``scaling_factor`` is 1, so ``decode`` takes them as they are):
  half of each batch the VAE latents of train-split scenes, half the one-step clean predictions
  x̂0 of the shipped UNet (classifier-free guided, at a uniformly drawn timestep) from those
  latents noised, since mid-trajectory x̂0 are blurrier than any clean scene;
* targets: the full VAE's decode of the same latents (distillation: the preview should show what
  the VAE would show, not the scene), with L1 + MSE;
* the encoder is trained too (MSE to the VAE's scaled posterior mean), so that the folder is a
  complete ``AutoencoderTiny``.

Batches are a pure function of (seed, step), and the phase checkpoints and resumes like the
others (:class:`addiffusion.worlds.shapes.train._Checkpoint`), so a resumed run ends with the same
weights as an uninterrupted one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import AutoencoderTiny, DiffusionPipeline
from tqdm import tqdm

from addiffusion.worlds.shapes.config import ShapesConfig

PREVIEW_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "encoder_block_out_channels": (16, 16, 16),
    "decoder_block_out_channels": (16, 16, 16),
    "num_encoder_blocks": (1, 1, 1),
    "num_decoder_blocks": (1, 1, 1),
    "upsampling_scaling_factor": 2,
    "act_fn": "relu",
    "upsample_fn": "nearest",
    "latent_magnitude": 3,
    "latent_shift": 0.5,
    "scaling_factor": 1.0,
    "shift_factor": 0.0,
}
"""32x32x3 <-> 8x8x4 like the shapes VAE: three blocks of 16 channels (``DecoderTiny`` keeps one
width throughout), two 2x up/down-samplings; a third of the VAE decoder's FLOPs (0.41 vs 1.25
GFLOP for 16 latents) with no attention and no mid block."""


def build_preview(seed: int) -> AutoencoderTiny:
    torch.manual_seed(seed)
    return AutoencoderTiny(**PREVIEW_CONFIG)


def save_preview(preview: AutoencoderTiny, out: Path) -> Path:
    """``save_pretrained`` without the ``block_out_channels`` key that ``AutoencoderTiny``
    registers but does not take (diffusers warns about it on every load otherwise)."""
    import json

    out = Path(out)
    preview.save_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    config.pop("block_out_channels", None)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out


def _x0_batch(
    pipe: DiffusionPipeline, cfg: ShapesConfig, step: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(latents, pixels, means)``: scaled latents ``(B, 4, 8, 8)`` (the first half of scenes
    sampled from the VAE posterior, the second half guided x̂0 of those noised at random
    timesteps), the scenes' pixels ``(B, 3, 32, 32)`` in [-1, 1] and their scaled VAE posterior
    means; a pure function of (seed, step)."""
    from addiffusion.worlds.shapes.train import scene_batch, to_pixels, tokenize

    images, captions = scene_batch(cfg.seed, "preview", step, cfg.preview_batch)
    vae, unet, sched = pipe.vae, pipe.unet, pipe.scheduler
    sf = vae.config.scaling_factor
    g = torch.Generator().manual_seed(cfg.seed * 1_000_033 + step)
    x = to_pixels(images, device)
    post = vae.encode(x).latent_dist
    mean = post.mean * sf
    z = mean + post.std * sf * torch.randn(mean.shape, generator=g).to(device)
    half = cfg.preview_batch // 2
    noisy = z[half:]
    if noisy.shape[0]:
        n = noisy.shape[0]
        t = torch.randint(0, sched.config.num_train_timesteps, (n,), generator=g).to(device)
        noise = torch.randn(noisy.shape, generator=g).to(device)
        x_t = sched.add_noise(noisy, noise, t)
        ids = tokenize(pipe.tokenizer, list(captions[half:]) + [""] * n, device)
        emb = pipe.text_encoder(ids)[0]
        out = unet(torch.cat([x_t, x_t]), torch.cat([t, t]), emb).sample
        cond, uncond = out.chunk(2)
        guided = uncond + cfg.guidance_scale * (cond - uncond)
        abar = sched.alphas_cumprod.to(device)[t].view(-1, 1, 1, 1)
        if sched.config.prediction_type == "v_prediction":
            x0 = abar.sqrt() * x_t - (1 - abar).sqrt() * guided
        elif sched.config.prediction_type == "epsilon":
            x0 = (x_t - (1 - abar).sqrt() * guided) / abar.sqrt()
        else:
            raise ValueError(
                f"the preview phase needs an epsilon or v-prediction UNet, got "
                f"{sched.config.prediction_type!r}"
            )
        z = torch.cat([z[:half], x0])
    return z, x, mean


def train_preview(
    pipe: DiffusionPipeline,
    cfg: ShapesConfig,
    ckpt_dir: Path,
    device: torch.device,
    progress: bool = True,
) -> AutoencoderTiny:
    """Distill ``pipe``'s VAE into a fresh :func:`build_preview` (see the module docstring);
    checkpoints into ``ckpt_dir/preview.pt`` and resumes from it."""
    from addiffusion.worlds.shapes.train import _Checkpoint

    preview = build_preview(cfg.seed).to(device)
    opt = torch.optim.AdamW(preview.parameters(), lr=cfg.preview_lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(cfg.preview_steps, 1))
    parts = {"model": preview, "opt": opt, "sched": sched}
    ck = _Checkpoint(ckpt_dir, "preview", cfg.checkpoint_minutes, parts)
    start = ck.restore()
    for m in (pipe.vae, pipe.unet, pipe.text_encoder):
        m.eval().requires_grad_(False)
    preview.train()
    sf = pipe.vae.config.scaling_factor
    bar = tqdm(
        range(start, cfg.preview_steps),
        desc="preview",
        initial=start,
        total=cfg.preview_steps,
        mininterval=10,
        disable=not progress,
    )
    for step in bar:
        with torch.no_grad():
            z, x, mean = _x0_batch(pipe, cfg, step, device)
            target = pipe.vae.decode(z / sf).sample.clamp(-1, 1)
        recon = preview.decode(z).sample
        rec = F.l1_loss(recon, target) + F.mse_loss(recon, target)
        enc = F.mse_loss(preview.encode(x).latents, mean)
        loss = rec + enc
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(rec=f"{rec.item():.4f}", enc=f"{enc.item():.4f}", refresh=False)
        if ck.due() or step + 1 == cfg.preview_steps:
            ck.save(step + 1)
    preview.eval()
    return preview
