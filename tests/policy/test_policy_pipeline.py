"""The drop-in sampler and `addiffusion generate` reproduce eval's rollout exactly, on the stock
shapes-world pipeline and on tiny SDXL / SD3 pipelines; mismatched packages fail clearly."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline
from PIL import Image
from policy_packages import SHAPES, SHAPES_CLIP, SHAPES_PIPE, SHAPES_PREVIEW, random_package
from tiny_backbones import SD3_DROP, save_sd3, save_sdxl

from addiffusion.cli import main
from addiffusion.diffusion.backbone import load_pipeline, load_preview
from addiffusion.diffusion.sampler import SamplerSettings, StepwiseSampler
from addiffusion.eval.rollout import run_method
from addiffusion.policy import AdaptiveDiffusionPipeline, AdaptivePolicy, PolicyPackageError
from addiffusion.rewards.clip import ClipScorer

PROMPTS = ["a red circle", "two blue squares left of a green triangle", "a yellow square", "one"]
SEEDS = [0, 1, 2, 3]


class Recorder:
    """Wraps a policy and keeps the action names it takes, per batch position."""

    def __init__(self, policy: AdaptivePolicy, n: int) -> None:
        self.policy = policy
        self.seen: list[list[str]] = [[] for _ in range(n)]
        self._active = list(range(n))

    def act(self, obs: np.ndarray, mask: np.ndarray) -> np.ndarray:
        actions = self.policy.act(obs, mask)
        names = self.policy.actions.names
        for i, a in zip(self._active, actions.tolist(), strict=True):
            self.seen[i].append(names[a])
        self._active = [
            i for i, a in zip(self._active, actions.tolist(), strict=True) if names[a] != "stop"
        ]
        return actions


@pytest.fixture(scope="module")
def shapes_pipe() -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(SHAPES_PIPE)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def shapes_clip() -> ClipScorer:
    return ClipScorer(str(SHAPES_CLIP))


@pytest.fixture(scope="module")
def package() -> AdaptivePolicy:
    return random_package(seed=6)


def _eval_rollout(
    pipe: DiffusionPipeline,
    scorer: ClipScorer,
    policy: AdaptivePolicy,
    prompts: list[str],
    seeds: list[int],
    solver: str = "ddim",
) -> tuple[object, list[list[str]]]:
    """What `addiffusion eval` runs for this policy (its sampler on the pipeline's modules with
    the policy's solver, one batch), and the actions taken."""
    settings = policy.config.settings()
    preview = None
    if settings.observe_with == "preview":
        preview = load_preview(policy.config.preview, torch.device("cpu"), torch.float32)
    sampler = StepwiseSampler(
        load_pipeline(str(SHAPES_PIPE), solver, "cpu") if pipe is None else pipe,
        scorer,
        settings,
        preview=preview,
    )
    rec = Recorder(policy, len(prompts))
    return run_method(sampler, rec, prompts, seeds, batch_size=len(prompts)), rec.seen


def test_drop_in_equals_eval_rollout(
    shapes_pipe: StableDiffusionPipeline, shapes_clip: ClipScorer, package: AdaptivePolicy
) -> None:
    adaptive = AdaptiveDiffusionPipeline(shapes_pipe, package)
    out = adaptive(
        PROMPTS, generator=[torch.Generator().manual_seed(s) for s in SEEDS], output_type="np"
    )
    ref, actions = _eval_rollout(None, shapes_clip, package, PROMPTS, SEEDS)
    images = (out.images * 255).round().astype(np.uint8)
    np.testing.assert_array_equal(images, ref.images)
    assert [t.nfe for t in out.traces] == ref.nfe.tolist()
    assert [t.stop_step for t in out.traces] == ref.stop_step.tolist()
    assert [list(t.actions) for t in out.traces] == actions
    taken = {a for t in out.traces for a in t.actions}
    # The comparison covers several strides and an early stop (not only the default path).
    assert len(taken & {"jump-1", "jump-2", "jump-4", "jump-8"}) >= 2, taken
    assert min(ref.stop_step) < SHAPES.n_max - 1
    assert all(t.seconds > 0 and t.seed == s for t, s in zip(out.traces, SEEDS, strict=True))


def test_a_restricted_package_takes_only_its_actions(
    shapes_pipe: StableDiffusionPipeline, shapes_clip: ClipScorer, package: AdaptivePolicy
) -> None:
    """An ablation package (restricted action space, a dropped observation part) runs in the
    drop-in as in eval, and never takes an action outside its set."""
    allowed = ("jump-1", "jump-4", "stop")
    restricted = random_package(seed=6, allowed_actions=allowed, observation_drop=("quality",))
    gens = [torch.Generator().manual_seed(s) for s in SEEDS]
    out = AdaptiveDiffusionPipeline(shapes_pipe, restricted)(PROMPTS, generator=gens)
    taken = {a for t in out.traces for a in t.actions}
    assert taken <= set(allowed) and "stop" in taken, taken
    _, actions = _eval_rollout(None, shapes_clip, restricted, PROMPTS, SEEDS)
    assert [list(t.actions) for t in out.traces] == actions
    _, free = _eval_rollout(None, shapes_clip, package, PROMPTS, SEEDS)
    assert {a for seen in free for a in seen} - set(allowed)  # unrestricted, it takes others


def test_a_policy_trained_on_preview_observations_observes_with_the_preview(
    shapes_pipe: StableDiffusionPipeline, shapes_clip: ClipScorer, tmp_path: Path
) -> None:
    """The package names its observations' decoder; the drop-in loads it and takes eval's actions
    on eval's images (the final images are the pipeline's VAE decode)."""
    settings = dataclasses.replace(SHAPES, observe_with="preview")
    package = random_package(settings, seed=6)
    package.save_pretrained(tmp_path / "pkg")
    loaded = AdaptivePolicy.from_pretrained(str(tmp_path / "pkg"))
    assert loaded.config.preview == str(SHAPES_PREVIEW)
    assert "the preview decoder" in (tmp_path / "pkg" / "README.md").read_text()
    adaptive = AdaptiveDiffusionPipeline(shapes_pipe, loaded)
    assert adaptive.preview is not None
    gens = [torch.Generator().manual_seed(s) for s in SEEDS]
    out = adaptive(PROMPTS, generator=gens, output_type="np")
    ref, actions = _eval_rollout(None, shapes_clip, loaded, PROMPTS, SEEDS)
    np.testing.assert_array_equal((out.images * 255).round().astype(np.uint8), ref.images)
    assert [list(t.actions) for t in out.traces] == actions
    plain, plain_actions = _eval_rollout(None, shapes_clip, random_package(seed=6), PROMPTS, SEEDS)
    assert plain_actions != actions  # the decoder changes what the policy sees
    with pytest.raises(PolicyPackageError, match="observe_with is 'preview' but preview is ''"):
        random_package(settings, preview="")


def test_generate_cli_equals_eval_rollout(
    tmp_path: Path, shapes_clip: ClipScorer, package: AdaptivePolicy, capsys: pytest.CaptureFixture
) -> None:
    package.save_pretrained(tmp_path / "pkg")
    out, trace, strip = tmp_path / "out.png", tmp_path / "trace.json", tmp_path / "strip.png"
    args = ["generate", PROMPTS[1], "--policy", str(tmp_path / "pkg"), "--seed", "1"]
    assert main([*args, "--out", str(out), "--trace", str(trace), "--filmstrip", str(strip)]) == 0
    printed = capsys.readouterr().out
    ref, actions = _eval_rollout(None, shapes_clip, package, [PROMPTS[1]], [1])
    np.testing.assert_array_equal(np.asarray(Image.open(out).convert("RGB")), ref.images[0])
    t = json.loads(trace.read_text())
    assert t["actions"] == actions[0] and t["nfe"] == int(ref.nfe[0])
    assert t["stop_step"] == int(ref.stop_step[0]) and t["pipeline_default_steps"] == 50
    assert f"generate: {t['nfe']} NFE (the pipeline's default: 50 steps" in printed
    assert Image.open(strip).size == (128 * len(actions[0]), 128 + 30)


def test_call_arguments(shapes_pipe: StableDiffusionPipeline, package: AdaptivePolicy) -> None:
    adaptive = AdaptiveDiffusionPipeline(shapes_pipe, package)
    before = dict(shapes_pipe.unet.attn_processors)
    scheduler = shapes_pipe.scheduler
    g = torch.Generator().manual_seed(7)
    out = adaptive(
        ["a red circle", "a blue square"],
        negative_prompt="green",
        num_images_per_prompt=2,
        generator=g,
        output_type="pt",
    )
    assert out.images.shape == (4, 3, 32, 32) and len(out.traces) == 4
    assert [t.prompt for t in out.traces] == ["a red circle"] * 2 + ["a blue square"] * 2
    assert out.nsfw_content_detected is None  # the shapes pipeline has no safety checker
    # the wrapped pipeline is left as it was: its scheduler and attention processors
    assert shapes_pipe.scheduler is scheduler
    assert {k: type(v) for k, v in shapes_pipe.unet.attn_processors.items()} == {
        k: type(v) for k, v in before.items()
    }
    latents = adaptive("a red circle", output_type="latent", return_dict=False)[0]
    assert latents.shape == (1, 4, 8, 8)
    negative = adaptive(
        "a red circle",
        negative_prompt="red",
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    )
    plain = adaptive("a red circle", generator=torch.Generator().manual_seed(0), output_type="np")
    assert not np.array_equal(negative.images, plain.images)
    with pytest.raises(TypeError, match="num_inference_steps.*the policy picks the schedule"):
        adaptive("a red circle", num_inference_steps=50)
    with pytest.raises(ValueError, match="got 1 generators for 2 images"):
        adaptive(["a", "b"], generator=[torch.Generator()])
    with pytest.raises(ValueError, match="output_type must be one of"):
        adaptive("a", output_type="mp4")


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_tiny_sdxl_and_sd3_run_the_drop_in(tmp_path: Path, family: str) -> None:
    clip = ClipScorer(str(SHAPES_CLIP))
    settings = SamplerSettings(n_max=4, strides=(1, 2), refine_budget=1, guidance_scale=3.0)
    if family == "sdxl":
        path, solver, drop = save_sdxl(tmp_path), "euler", ()
        settings = dataclasses.replace(settings, strides=(1,))  # Euler: stride 1 only
    else:
        path, solver, drop = save_sd3(tmp_path), "flowmatch-euler", SD3_DROP
    policy = random_package(settings, family=family, solver=solver, backbone=str(path), seed=1)
    pipe = DiffusionPipeline.from_pretrained(path, **dict.fromkeys(drop, None))
    pipe.set_progress_bar_config(disable=True)
    out = AdaptiveDiffusionPipeline(pipe, policy)(
        PROMPTS[:2],
        generator=[torch.Generator().manual_seed(s) for s in SEEDS[:2]],
        output_type="np",
    )
    ref, actions = _eval_rollout(
        load_pipeline(str(path), solver, "cpu", drop_components=drop),
        clip,
        policy,
        PROMPTS[:2],
        SEEDS[:2],
    )
    np.testing.assert_array_equal((out.images * 255).round().astype(np.uint8), ref.images)
    assert [list(t.actions) for t in out.traces] == actions
    assert [t.nfe for t in out.traces] == ref.nfe.tolist()


def test_mismatched_packages_fail_clearly(
    tmp_path: Path, shapes_pipe: StableDiffusionPipeline, shapes_clip: ClipScorer
) -> None:
    with pytest.raises(PolicyPackageError, match="scorer gives 64-dim features.*32-dim image"):
        AdaptiveDiffusionPipeline(shapes_pipe, random_package(feature_dim=32), scorer=shapes_clip)
    with pytest.raises(PolicyPackageError, match="'flowmatch-euler' solver, which does not fit"):
        AdaptiveDiffusionPipeline(shapes_pipe, random_package(solver="flowmatch-euler"))
    with pytest.raises(
        PolicyPackageError, match="the pipeline is sd, the policy was trained on sdxl"
    ):
        AdaptiveDiffusionPipeline(shapes_pipe, random_package(family="sdxl"))
    # Euler has no variable-stride steps: a policy trained with jumps of 2..8 cannot run on it.
    with pytest.raises(
        PolicyPackageError, match=r"euler sampler offers actions \['jump-1', 'stop'"
    ):
        AdaptiveDiffusionPipeline(shapes_pipe, random_package(solver="euler"), scorer=shapes_clip)
    # A package whose config and weights disagree is refused when loading, naming the file.
    random_package().save_pretrained(tmp_path / "pkg")
    cfg = json.loads((tmp_path / "pkg" / "config.json").read_text())
    cfg["observation"]["image_dim"] = 32
    (tmp_path / "pkg" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        PolicyPackageError, match="config.json: networks.0. takes observations of dim 149"
    ):
        AdaptivePolicy.from_pretrained(tmp_path / "pkg")
