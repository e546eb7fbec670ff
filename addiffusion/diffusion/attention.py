"""Cross-attention capture and the token-aware under-generation mask used by *refine*.

Capture goes through diffusers' own extension point: :func:`install_attention_capture` sets a
:class:`CaptureAttnProcessor` on the UNet's cross-attention layers only (``attn2``) with
``unet.set_attn_processor``; self-attention keeps its stock processor (SD3's joint attention:
:class:`CaptureJointAttnProcessor` wraps the stock one). The capture processor
computes cross-attention exactly like diffusers' ``AttnProcessor`` (explicit softmax, so the
probabilities exist) and, while a :class:`AttentionStore` is recording, adds the conditional
branch's head-averaged probabilities, resized to latent resolution, into the store.

The mask (:func:`undergeneration_mask`) follows Attend-and-Excite's notion of a *neglected* token:
attention re-normalised over the prompt's content tokens (no start/end/padding tokens, no
stop words); a token whose peak attention is low has not claimed a region yet. The neglect
score is, per latent pixel, the largest ``neglect_j * P_j(x) / max P_j`` over content tokens j
(``neglect_j = 1 - peak_j``, ``P_j`` the token's spatial distribution): where a neglected token's
object would go. Its core is Gaussian-blurred in latent space; the mask lies in [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

STOP_WORDS = frozenset(
    "a an the and or of in on at to with above below left right of is are it its this that".split()
)
"""Function words: they carry no region of their own, so they never count as neglected."""


class AttentionStore:
    """Running sum of cross-attention maps for one denoiser call.

    ``maps``: ``(B, L, h, w)`` float32, the conditional branch's attention from every latent pixel
    to every text token, averaged over heads and (after :meth:`result`) over layers.
    """

    def __init__(self) -> None:
        self.recording = False
        self.latent_hw: tuple[int, int] = (0, 0)
        self.sum: torch.Tensor | None = None
        self.layers = 0

    def begin(self, latent_hw: tuple[int, int]) -> None:
        self.recording = True
        self.latent_hw = latent_hw
        self.sum = None
        self.layers = 0

    def add(self, probs: torch.Tensor, heads: int) -> None:
        """``probs``: ``(2B * heads, Q, L)`` softmax probabilities of a CFG-batched call."""
        h, w = self.latent_hw
        q, n_tok = probs.shape[-2:]
        grid = _grid_for(q, h, w)
        if grid is None:  # a resolution the latent grid cannot be mapped onto: skip the layer
            return
        maps = probs.float().view(-1, heads, q, n_tok).mean(1)
        maps = maps[maps.shape[0] // 2 :]  # conditional half of [uncond, cond]
        maps = maps.transpose(1, 2).reshape(maps.shape[0], n_tok, *grid)
        if grid != (h, w):
            maps = F.interpolate(maps, size=(h, w), mode="bilinear", align_corners=False)
        self.sum = maps if self.sum is None else self.sum + maps
        self.layers += 1

    def result(self) -> torch.Tensor | None:
        """``(B, L, h, w)`` layer-averaged maps of the last call, or None if nothing was seen."""
        self.recording = False
        if self.sum is None:
            return None
        return self.sum / self.layers


def _grid_for(q: int, h: int, w: int) -> tuple[int, int] | None:
    # UNet levels halve the grid (rounding up on odd sizes).
    for k in range(8):
        gh, gw = math.ceil(h / 2**k), math.ceil(w / 2**k)
        if gh * gw == q:
            return gh, gw
    return None


class CaptureAttnProcessor:
    """diffusers' ``AttnProcessor`` computation for cross-attention, recording the probabilities
    into ``store`` while it records. Output equals the stock processor up to float rounding."""

    def __init__(self, store: AttentionStore) -> None:
        self.store = store

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch_size, seq_len, _ = context.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, seq_len, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        key = attn.head_to_batch_dim(attn.to_k(context))
        value = attn.head_to_batch_dim(attn.to_v(context))
        query = attn.head_to_batch_dim(query)
        probs = attn.get_attention_scores(query, key, attention_mask)
        if self.store.recording:
            self.store.add(probs, attn.heads)
        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class CaptureJointAttnProcessor:
    """Wraps an MMDiT joint-attention processor (SD3): the output is the wrapped processor's;
    while recording, the image queries' attention over the *text* keys is added to the store.

    Joint attention softmaxes over image and text keys together; the mask only uses attention
    re-normalised over text tokens, which equals a softmax over the text keys alone, so only
    those logits are computed (cheap: L text keys instead of N + L)."""

    def __init__(self, store: AttentionStore, inner: object) -> None:
        self.store = store
        self.inner = inner

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *args: object,
        **kwargs: object,
    ) -> torch.Tensor:
        if self.store.recording and encoder_hidden_states is not None:
            b, n, _ = hidden_states.shape
            q = attn.to_q(hidden_states)
            k = attn.add_k_proj(encoder_hidden_states)
            d = k.shape[-1] // attn.heads
            q = q.view(b, n, attn.heads, d).transpose(1, 2)
            k = k.view(b, -1, attn.heads, d).transpose(1, 2)
            if attn.norm_q is not None:
                q = attn.norm_q(q)
            if attn.norm_added_k is not None:
                k = attn.norm_added_k(k)
            probs = (q.float() @ k.float().transpose(-1, -2) * attn.scale).softmax(-1)
            self.store.add(probs.reshape(b * attn.heads, n, -1), attn.heads)
        return self.inner(
            attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs
        )


def install_attention_capture(denoiser: torch.nn.Module) -> AttentionStore:
    """Set capture processors through ``set_attn_processor``: :class:`CaptureAttnProcessor` on a
    UNet's cross-attention layers (``attn2``), :class:`CaptureJointAttnProcessor` around an
    MMDiT's joint-attention layers (those with text projections); other layers keep their
    processors. Returns the store the processors record into.

    Installing twice keeps the processors already there and returns their store: samplers that
    share one pipeline (eval's fixed baselines) share one store.
    """
    procs = dict(denoiser.attn_processors)
    for proc in procs.values():
        if isinstance(proc, CaptureAttnProcessor | CaptureJointAttnProcessor):
            return proc.store
    store = AttentionStore()
    joint = {
        f"{name}.processor"
        for name, module in denoiser.named_modules()
        if isinstance(module, Attention) and getattr(module, "add_k_proj", None) is not None
    }
    cross = [name for name in procs if name.endswith("attn2.processor") and name not in joint]
    if not cross and not joint:
        raise ValueError(
            f"{type(denoiser).__name__} has no cross- or joint-attention layers: refine masks "
            "need them"
        )
    capture = CaptureAttnProcessor(store)
    for name in cross:
        procs[name] = capture
    for name in joint:
        procs[name] = CaptureJointAttnProcessor(store, procs[name])
    denoiser.set_attn_processor(procs)
    return store


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``(B, 1, h, w)`` maps (kernel radius ``ceil(3 sigma)``)."""
    if sigma <= 0:
        return x
    radius = max(1, math.ceil(3 * sigma))
    coords = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-(coords**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    x = F.pad(x, (radius, radius, radius, radius), mode="replicate")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1))
    return F.conv2d(x, kernel.view(1, 1, -1, 1))


def content_token_mask(
    token_texts: Sequence[Sequence[str]], special: Sequence[Sequence[bool]]
) -> torch.Tensor:
    """``(B, L)`` bool: tokens that are neither special (start/end/padding) nor stop words."""
    rows = []
    for texts, specials in zip(token_texts, special, strict=True):
        rows.append(
            [
                not sp
                and t.strip().lower().removesuffix("</w>") not in STOP_WORDS
                and t.strip() != ""
                for t, sp in zip(texts, specials, strict=True)
            ]
        )
    return torch.tensor(rows, dtype=torch.bool)


def undergeneration_mask(
    maps: torch.Tensor, content: torch.Tensor, blur_sigma: float = 1.0, threshold: float = 0.5
) -> torch.Tensor:
    """Token-aware soft mask of under-generated regions.

    maps: ``(B, L, h, w)`` cross-attention probabilities (each pixel's row sums to 1 over L);
    content: ``(B, L)`` bool content tokens. Returns ``(B, h, w)`` float32 in [0, 1]: the core
    (pixels whose neglect score is at least ``threshold`` of the image's largest) blurred with a
    Gaussian of ``blur_sigma`` latent pixels and scaled by the largest neglect score, so that
    pixels farther than ``3 blur_sigma`` from the core are exactly 0 (kept by refine) and a prompt
    whose tokens are all well attended gets a weak mask. All zeros without content tokens.
    """
    b, n_tok, h, w = maps.shape
    content = content.to(maps.device)[:, :n_tok]
    if content.shape[1] < n_tok:
        content = F.pad(content, (0, n_tok - content.shape[1]))
    keep = content[:, :, None, None].float()
    # Re-normalise over content tokens (Attend-and-Excite drops the start token that absorbs mass).
    a = maps.float() * keep
    a = a / a.sum(1, keepdim=True).clamp_min(1e-8)
    peak = a.flatten(2).amax(-1)  # (B, L): how strongly each token claims some pixel
    neglect = (1 - peak).clamp(0, 1) * content.float()
    spatial = a / a.flatten(2).amax(-1).clamp_min(1e-8)[..., None, None]  # each token peaks at 1
    raw = (neglect[..., None, None] * spatial).amax(1, keepdim=True)  # (B, 1, h, w)
    top = raw.flatten(1).amax(-1).view(b, 1, 1, 1)
    core = ((raw >= threshold * top) & (top > 0)).float()
    soft = gaussian_blur(core, blur_sigma)
    # Blurring lowers a small core's peak; put every mask's peak at its largest neglect score.
    soft = soft / soft.flatten(1).amax(-1).clamp_min(1e-8).view(b, 1, 1, 1) * top
    return soft.clamp(0, 1)[:, 0]
