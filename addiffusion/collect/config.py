"""``collect`` section of ``params.yaml``: backbone, scorer, the sampler's MDP settings, prompts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

from addiffusion.config import StageConfig, check

if TYPE_CHECKING:
    from addiffusion.diffusion.sampler import SamplerSettings


@dataclass(frozen=True)
class CollectConfig(StageConfig):
    """Record full denoising trajectories of ``prompts × seeds`` to ``n_max`` steps."""

    section: ClassVar[str] = "collect"

    model: str = "models/tiny"
    """diffusers pipeline: a local folder or a Hub id (loaded with ``from_pretrained``)."""
    scorer: str = "models/tiny-clip"
    """open_clip scorer: a local folder, ``hf-hub:org/repo`` or ``name@pretrained``."""
    scheduler: str = "ddim"
    """One of ddim, dpmsolver++, euler, unipc."""
    guidance_scale: float = 5.0
    height: int = 32
    width: int = 32
    n_max: int = 12
    """Points of the fine grid the policy jumps on; an episode stops at point n_max - 1 at the
    latest."""
    grid: str = "uniform"
    """Base grid the points sit on: ``uniform`` (the scheduler's ``set_timesteps(n_max)``),
    ``ays`` (an Align-Your-Steps-style grid: SD 1.5's AYS sigmas log-linearly interpolated to
    ``n_max`` points) or ``custom`` (``timesteps``). ays / custom need ddim, dpmsolver++, euler
    or flowmatch-euler."""
    timesteps: tuple[int, ...] = ()
    """The custom grid: ``n_max`` strictly decreasing training timesteps (only with grid custom)."""
    strides: tuple[int, ...] = (1, 2, 4, 8)
    """Jump strides (``jump-s`` actions; must include 1). Solvers without variable-stride steps
    (euler, unipc) offer only stride 1."""
    warmup: int = 1
    """Stop and refine are illegal before grid point ``warmup`` (jumps only)."""
    refine_budget: int = 1
    """Refines allowed per episode (0 masks refine off)."""
    refine_k: int = 2
    """Re-denoise iterations per refine (k NFE)."""
    mask_blur_sigma: float = 1.0
    """Gaussian blur of the under-generation mask, in latent pixels."""
    x0_decode_scale: float = 1.0
    """Per-step x̂0 decoded from latents resized by this factor (1 = exact; 0.5 = a quarter of
    the decode cost, features and scores from a half-size image). Final images: full size."""
    observe_with: str = "vae"
    """Decoder of the per-step x̂0 observations: ``vae`` (the pipeline's own, exact) or
    ``preview`` (the TAESD-style ``AutoencoderTiny`` that ``preview`` names; features, scores and
    the recorded per-step components then come from the preview). Final images are always the
    full VAE's. The dataset records which one, and eval, online fine-tuning and the drop-in
    sampler observe with the same."""
    preview: str = "assets/shapes/preview"
    """The preview decoder (``observe_with: preview``): an ``AutoencoderTiny`` folder or Hub id
    (``madebyollin/taesd`` for SD 1.x/2.x, ``madebyollin/taesdxl``, ``madebyollin/taesd3``)."""
    const_stride_prob: float = 0.5
    """Behaviour policy: fraction of root episodes that follow one constant stride (uniform over
    ``strides``: the fixed schedules); the others draw a stride uniformly at every point."""
    branch_prob: float = 0.2
    """Behaviour policy: probability, at each point of a root where stop is legal, of a recorded
    branch that takes another action (another jump or refine) and continues at random strides."""
    max_branches: int = 1
    """At most this many branches per root episode."""
    drop_components: tuple[str, ...] = ()
    """Pipeline components loaded as None (e.g. SD3's ``text_encoder_3``, ``tokenizer_3``)."""
    scorers: tuple[str, ...] = ()
    """Extra learned scorers recorded as raw components: any of imagereward, pickscore (real
    backbones; the shapes world's verifier is added by itself for ``prompts: shapes``)."""
    imagereward: str = "THUDM/ImageReward"
    """ImageReward checkpoint: Hub id, folder with ImageReward.pt (+ med_config.json) or .pt file."""
    pickscore_model: str = "yuvalkirstain/PickScore_v1"
    """PickScore CLIPModel: Hub id or save_pretrained folder."""
    pickscore_processor: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
    """PickScore's CLIPProcessor: Hub id or folder."""
    prompts: str = "builtin"
    """``builtin``, ``shapes`` (the shapes world's tiers), a prompt file or folder (DrawBench .csv,
    PartiPrompts .tsv, COCO captions .json, GenEval .jsonl, T2I-CompBench folder of .txt, plain
    .txt) or ``hf:<dataset id>[:<split>]`` (``datasets.load_dataset``)."""
    n_prompts: int = 24
    """How many prompts to take from the source (0 = all)."""
    seeds_per_prompt: int = 2
    heldout_fraction: float = 0.25
    """Fraction of prompts held out from training (kept for evaluation)."""
    shard_size: int = 8
    """Episodes per store shard; the unit of resumption."""
    batch_size: int = 8
    """Episodes denoised together."""
    record_latents: bool = False
    """Also store x̂0 latents (float16) per step."""
    record_thumbnails: bool = True
    """Also store decoded x̂0 thumbnails (uint8) per step."""
    profile_blocks: bool = False
    """Also record, per step, the latency of each top-level denoiser block (attention / resnet
    split) and its peak memory, through forward hooks (:mod:`addiffusion.diffusion.profile`),
    into the steps table's ``block_time_s`` / ``block_peak_mem_bytes``. On CUDA the hooks
    synchronise: profiled steps run slower."""
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"

    def __post_init__(self) -> None:
        # Imported here: `addiffusion --help` imports every config module, and diffusers is slow.
        from addiffusion.diffusion.backbone import GRIDS, SCHEDULERS

        bad = sorted(set(self.scorers) - {"imagereward", "pickscore"})
        check(not bad, "collect.scorers", "a list of imagereward, pickscore", list(self.scorers))
        check(
            self.scheduler in SCHEDULERS,
            "collect.scheduler",
            f"one of {', '.join(SCHEDULERS)}",
            self.scheduler,
        )
        check(self.n_max >= 1, "collect.n_max", ">= 1", self.n_max)
        check(self.grid in GRIDS, "collect.grid", f"one of {', '.join(GRIDS)}", self.grid)
        check(
            (self.grid == "custom") == bool(self.timesteps),
            "collect.timesteps",
            "a list exactly when grid is custom",
            list(self.timesteps),
        )
        check(
            not self.timesteps
            or (
                len(self.timesteps) == self.n_max
                and all(a > b for a, b in zip(self.timesteps, self.timesteps[1:], strict=False))
            ),
            "collect.timesteps",
            f"n_max = {self.n_max} strictly decreasing training timesteps",
            list(self.timesteps),
        )
        check(
            0 <= self.warmup < self.n_max,
            "collect.warmup",
            f"in [0, n_max) = [0, {self.n_max})",
            self.warmup,
        )
        check(self.refine_budget >= 0, "collect.refine_budget", ">= 0", self.refine_budget)
        check(self.mask_blur_sigma >= 0, "collect.mask_blur_sigma", ">= 0", self.mask_blur_sigma)
        check(
            0.0 < self.x0_decode_scale <= 1.0,
            "collect.x0_decode_scale",
            "in (0, 1]",
            self.x0_decode_scale,
        )
        check(
            self.observe_with in ("vae", "preview"),
            "collect.observe_with",
            "vae or preview",
            self.observe_with,
        )
        check(
            self.observe_with != "preview" or bool(self.preview),
            "collect.preview",
            "an AutoencoderTiny folder or Hub id when collect.observe_with is preview",
            self.preview,
        )
        check(0.0 <= self.branch_prob <= 1.0, "collect.branch_prob", "in [0, 1]", self.branch_prob)
        check(
            1 in self.strides
            and all(s >= 1 for s in self.strides)
            and len(set(self.strides)) == len(self.strides),
            "collect.strides",
            "distinct integers >= 1 including 1",
            list(self.strides),
        )
        check(
            0.0 <= self.const_stride_prob <= 1.0,
            "collect.const_stride_prob",
            "in [0, 1]",
            self.const_stride_prob,
        )
        check(self.max_branches >= 0, "collect.max_branches", ">= 0", self.max_branches)
        check(self.refine_k >= 1, "collect.refine_k", ">= 1", self.refine_k)
        check(self.guidance_scale >= 1.0, "collect.guidance_scale", ">= 1.0", self.guidance_scale)
        for key in ("height", "width"):
            v = getattr(self, key)
            check(v >= 8 and v % 8 == 0, f"collect.{key}", "a positive multiple of 8", v)
        check(self.n_prompts >= 0, "collect.n_prompts", ">= 0", self.n_prompts)
        check(self.seeds_per_prompt >= 1, "collect.seeds_per_prompt", ">= 1", self.seeds_per_prompt)
        check(
            0.0 <= self.heldout_fraction < 1.0,
            "collect.heldout_fraction",
            "in [0, 1)",
            self.heldout_fraction,
        )
        check(self.shard_size >= 1, "collect.shard_size", ">= 1", self.shard_size)
        check(self.batch_size >= 1, "collect.batch_size", ">= 1", self.batch_size)
        check(
            self.seed >= 0, "collect.seed", ">= 0 (numpy and torch seeds are unsigned)", self.seed
        )

    @property
    def sampler(self) -> SamplerSettings:
        from addiffusion.diffusion.sampler import SamplerSettings

        return SamplerSettings(
            n_max=self.n_max,
            grid=self.grid,
            timesteps=tuple(self.timesteps),
            strides=tuple(self.strides),
            warmup=self.warmup,
            refine_budget=self.refine_budget,
            refine_k=self.refine_k,
            guidance_scale=self.guidance_scale,
            height=self.height,
            width=self.width,
            mask_blur_sigma=self.mask_blur_sigma,
            x0_decode_scale=self.x0_decode_scale,
            observe_with=self.observe_with,
        )
