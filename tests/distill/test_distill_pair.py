"""Teacher/student pairs: the student built from params, alignment of the rollout, the mismatch
error, and a tiny SD3 pair through the same from_pretrained path and rollout API."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from distill_tiny import tiny_config
from tiny_backbones import SD3_DROP, save_sd3

from addiffusion.diffusion import backbone
from addiffusion.distill import losses as L
from addiffusion.distill.pair import (
    AlignmentError,
    align_timesteps,
    draw_noise,
    encode,
    guided,
    load_pair,
    make_pair,
    rollout,
    sample,
)


@pytest.fixture(scope="module")
def shapes_pair():
    return load_pair(tiny_config(), "cpu")


def test_copy_student_is_the_teacher_with_fewer_blocks(shapes_pair) -> None:
    t, s = shapes_pair.teacher.unet, shapes_pair.student.unet
    assert s.mid_block is None and t.mid_block is not None
    assert type(s.down_blocks[0]).__name__ == "DownBlock2D"
    assert sum(p.numel() for p in s.parameters()) < sum(p.numel() for p in t.parameters())
    ts = t.state_dict()
    for name, tensor in s.state_dict().items():
        assert torch.equal(tensor, ts[name]), name  # every student tensor is the teacher's
    assert s.parameters().__next__().requires_grad
    assert not any(p.requires_grad for p in t.parameters())


def test_random_student_is_not_a_copy() -> None:
    pair = load_pair(tiny_config(student_init="random"), "cpu")
    t, s = pair.teacher.unet.state_dict(), pair.student.unet.state_dict()
    assert not torch.equal(t["conv_in.weight"], s["conv_in.weight"])


def test_rollout_is_aligned_with_the_teacher_at_the_students_states(shapes_pair) -> None:
    pair = shapes_pair
    cond = encode(pair, ["a red circle", "two blue squares"])
    noise = draw_noise(pair, [3, 4])
    ro = rollout(pair, cond, noise, grad=True)
    n = pair.n_steps
    assert len(ro.states) == len(ro.teacher) == len(ro.student) == n
    assert ro.timesteps.tolist() == pair.timesteps.tolist() == [999, 749, 499, 249]
    assert ro.student[0].requires_grad and not ro.teacher[0].requires_grad
    for k in range(n):
        again = guided(
            pair.teacher.unet,
            pair.teacher,
            pair.scheduler,
            pair.space,
            ro.states[k],
            k,
            cond.teacher,
            pair.guidance_scale,
        )
        assert torch.allclose(ro.teacher[k], again, atol=1e-5)  # graded at x_t^student, t_k
    # The states are the student's own trajectory, not the teacher's.
    assert torch.allclose(ro.final, sample(pair, "student", cond, noise), atol=1e-5)
    assert not torch.allclose(ro.final, sample(pair, "teacher", cond, noise), atol=1e-3)
    parts = L.distill_losses(
        pair.scheduler, pair.space, ro.states, ro.teacher, ro.student, 1.0, 1e-3
    )
    parts.total(1.0, 1.0).backward()
    assert pair.student.unet.conv_in.weight.grad is not None


def test_mismatched_schedules_are_an_error(shapes_pair) -> None:
    with pytest.raises(AlignmentError, match="4 timesteps, student 3"):
        align_timesteps(torch.tensor([999, 749, 499, 249]), torch.tensor([999, 666, 333]))
    with pytest.raises(AlignmentError, match="differ at step 1"):
        align_timesteps(torch.tensor([999, 749, 499]), torch.tensor([999, 666, 333]))
    other = shapes_pair.student
    student = copy.copy(other)
    sched = copy.deepcopy(other.scheduler)
    sched.register_to_config(timestep_spacing="leading")  # another grid on the same betas
    student.scheduler = sched
    with pytest.raises(AlignmentError, match="timesteps differ"):
        make_pair(shapes_pair.teacher, student, 4, 4.0, 32, 32)
    sched = copy.deepcopy(other.scheduler)
    sched.register_to_config(prediction_type="epsilon")
    student.scheduler = sched
    with pytest.raises(AlignmentError, match="prediction_type"):
        make_pair(shapes_pair.teacher, student, 4, 4.0, 32, 32)


def test_copy_needs_the_teachers_channels() -> None:
    from addiffusion.config import UserError

    with pytest.raises(UserError, match="student_channels"):
        load_pair(tiny_config(student_channels=(32, 64)), "cpu")


def test_tiny_sd3_pair_rolls_out_through_the_same_api(tmp_path: Path) -> None:
    """SD3 (flow matching, MMDiT) teacher and a pretrained SD3 student of its own weights, both
    loaded with from_pretrained: the same rollout and losses (the KL of the eta=1 flow kernel)."""
    teacher_dir = save_sd3(tmp_path / "t")
    torch.manual_seed(1)
    student_dir = save_sd3(tmp_path / "s")
    # Another init of the student's transformer: the two models differ.
    from diffusers import SD3Transformer2DModel

    tr = SD3Transformer2DModel.from_pretrained(student_dir / "transformer")
    with torch.no_grad():
        for p in tr.parameters():
            p.add_(0.05 * torch.randn_like(p))
    tr.save_pretrained(student_dir / "transformer")
    cfg = tiny_config(
        teacher=str(teacher_dir),
        student=str(student_dir),
        student_init="pretrained",
        scheduler="flowmatch-euler",
        drop_components=SD3_DROP,
        height=16,
        width=16,
        n_steps=3,
    )
    pair = load_pair(cfg, "cpu")
    assert backbone.model_family(pair.student) == "sd3" and pair.space == "flow"
    cond = encode(pair, ["a red circle"])
    ro = rollout(pair, cond, draw_noise(pair, [0]), grad=True)
    assert len(ro.states) == 3 and ro.states[0].shape == (1, 4, 8, 8)
    parts = L.distill_losses(
        pair.scheduler, pair.space, ro.states, ro.teacher, ro.student, 1.0, 1e-3
    )
    assert torch.isfinite(parts.total(1.0, 1.0)) and float(parts.kl.detach()) > 0
    parts.total(1.0, 1.0).backward()
    assert any(p.grad is not None for p in pair.student.transformer.parameters())
    # Another flow shift is another schedule: refused.
    other = FlowMatchEulerDiscreteScheduler.from_config(pair.student.scheduler.config, shift=3.0)
    pair.student.scheduler = other
    with pytest.raises(AlignmentError):
        make_pair(pair.teacher, pair.student, 3, 4.0, 16, 16)
