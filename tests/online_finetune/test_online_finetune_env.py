"""The vector env over the stepwise sampler and its SB3 adapter (tiny models, n_max = 6, jump
strides 1/2/4: the action table is jump-1, jump-2, jump-4, stop, refine)."""

from __future__ import annotations

import numpy as np
import pytest
from gymnasium.wrappers.vector import RecordEpisodeStatistics
from online_finetune_consts import N_MAX, PROMPTS, STATS, STRIDES, WARMUP
from sb3_contrib.common.maskable.utils import get_action_masks, is_masking_supported

from addiffusion.online_finetune.env import SamplerVectorEnv
from addiffusion.online_finetune.sb3_adapter import Sb3VecEnv
from addiffusion.rewards.config import RewardConfig
from addiffusion.rewards.reward import quality

REWARDS = RewardConfig(weights={"clip_score": 1.0, "stability": 0.5}, c_nfe=0.05)


def make_env(sampler, n: int = 2, seed: int = 0) -> SamplerVectorEnv:
    return SamplerVectorEnv(sampler, PROMPTS, n, REWARDS, STATS, seed=seed)


def q_of(env: SamplerVectorEnv) -> np.ndarray:
    return quality({k: [ep.components[k] for ep in env.episodes] for k in STATS}, REWARDS, STATS)


def only(table, *ids: int) -> list[bool]:
    return [j in ids for j in range(table.n)]


def test_spaces_reset_and_masks(sampler) -> None:
    env = make_env(sampler)
    t = env.table
    assert t is sampler.table and t.strides == STRIDES
    dim = env.single_observation_space.shape[0]
    assert env.observation_space.shape == (2, dim)
    assert env.action_space.shape == (2,) and env.single_action_space.n == t.n
    obs, info = env.reset(seed=0)
    assert obs.shape == (2, dim) and obs.dtype == np.float32 and info == {}
    assert env.observation_space.contains(obs)
    # point 0 is warm-up: jumps only (no stop, no refine)
    assert WARMUP == 1
    np.testing.assert_array_equal(env.action_masks(), [only(t, *t.jumps)] * 2)
    with pytest.raises(ValueError, match="sub-env 1 .*action stop is not allowed.*legal: jump-1"):
        env.step(np.array([t.jump(1), t.stop]))
    with pytest.raises(ValueError, match="id 99 is not allowed"):
        env.step(np.array([t.jump(1), 99]))
    with pytest.raises(ValueError, match="expected 2 actions"):
        env.step(np.array([0, 0, 0]))


def test_prompts_cycle_through_the_list(sampler) -> None:
    env = make_env(sampler, n=len(PROMPTS) + 1)
    env.reset(seed=0)
    first = [ep.prompt for ep in env.episodes]
    assert sorted(first[: len(PROMPTS)]) == sorted(PROMPTS)  # one pass before any repeat
    assert len({ep.seed for ep in env.episodes}) == len(first)


def test_same_seed_same_episodes(sampler) -> None:
    a, _ = make_env(sampler, seed=3).reset(seed=3)
    b, _ = make_env(sampler, seed=3).reset()
    c, _ = make_env(sampler, seed=3).reset(seed=4)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_one_apply_call_per_step(sampler, monkeypatch: pytest.MonkeyPatch) -> None:
    """All sub-envs' actions (different kinds) go to the sampler in one ``apply`` call."""
    env = make_env(sampler, n=3)
    t = env.table
    env.reset(seed=0)
    env.step(np.array([t.jump(1)] * 3))  # past warm-up
    calls = []
    real = sampler.apply

    def spy(episodes, actions):
        calls.append(np.asarray(actions).tolist())
        return real(episodes, actions)

    monkeypatch.setattr(sampler, "apply", spy)
    env.step(np.array([t.jump(4), t.stop, t.jump(2)]))
    assert calls == [[t.jump(4), t.stop, t.jump(2)]]


def test_jump_of_stride_4_moves_4_points_for_1_nfe(sampler) -> None:
    """jump-4 and jump-1 side by side in one step; the reward charges the 1 NFE of the jump."""
    env = make_env(sampler)
    t = env.table
    env.reset(seed=0)
    q0 = q_of(env)
    assert [(ep.step, ep.nfe) for ep in env.episodes] == [(0, 1), (0, 1)]
    _, r, term, _, _ = env.step(np.array([t.jump(4), t.jump(1)]))
    assert [(ep.step, ep.nfe) for ep in env.episodes] == [(4, 2), (1, 2)]
    assert not term.any()
    np.testing.assert_allclose(r, q_of(env) - q0 - REWARDS.c_nfe, rtol=1e-5, atol=1e-6)
    # a stride past the grid's end lands on its last point, which allows only stop
    q4 = q_of(env)
    _, r, _, _, _ = env.step(np.array([t.jump(4), t.jump(2)]))
    assert [(ep.step, ep.nfe) for ep in env.episodes] == [(N_MAX - 1, 3), (3, 3)]
    np.testing.assert_allclose(r, q_of(env) - q4 - REWARDS.c_nfe, rtol=1e-5, atol=1e-6)
    masks = env.action_masks()
    np.testing.assert_array_equal(masks[0], only(t, t.stop))
    np.testing.assert_array_equal(masks[1], only(t, *t.jumps, t.stop))  # no refine budget
    with pytest.raises(ValueError, match="sub-env 0 .*jump-1 is not allowed.*legal: stop$"):
        env.step(np.array([t.jump(1), t.jump(1)]))


def test_nfe_rewards_and_autoreset(sampler) -> None:
    """Sub-env 0 stops at point 1, sub-env 1 runs jump-1 to the forced stop at n_max - 1: they sit
    at different points in the same batch; NFE of a stride-1 episode stopping at i is i + 1.
    Autoreset is next-step: the stopped sub-env restarts in the step after its stop."""
    env = make_env(sampler)
    t = env.table
    one = t.jump(1)
    env.reset(seed=0)
    ep_returns = np.zeros(2)
    q0 = q_of(env)

    obs, r, term, trunc, info = env.step(np.array([one, one]))
    assert [ep.step for ep in env.episodes] == [1, 1] and not term.any() and info == {}
    q1 = q_of(env)
    np.testing.assert_allclose(r, q1 - q0 - REWARDS.c_nfe, rtol=1e-5, atol=1e-6)
    ep_returns += r
    stopped = env.episodes[0]

    obs, r, term, trunc, info = env.step(np.array([t.stop, one]))
    np.testing.assert_array_equal(term, [True, False])
    assert not trunc.any()
    np.testing.assert_allclose(r[0], REWARDS.terminal_bonus * q1[0], rtol=1e-5)
    ep_returns += r
    assert stopped.done and stopped.nfe == 2  # stopped at point 1 -> 2 NFE
    assert "episode" not in info  # gymnasium's RecordEpisodeStatistics writes that key
    np.testing.assert_array_equal(info["_final_episode"], [True, False])
    assert info["final_episode"]["nfe"][0] == 2 and info["final_episode"]["l"][0] == 2
    np.testing.assert_allclose(info["final_episode"]["r"][0], ep_returns[0], rtol=1e-5)
    # next-step autoreset: this step returns the terminal observation, the episode stays
    assert env.episodes[0] is stopped
    assert obs[0][-2] == pytest.approx(2 / N_MAX)  # nfe_frac of the stopped one
    np.testing.assert_array_equal(env.action_masks()[0], [True] * t.n)  # ignored next step

    # the next step ignores sub-env 0's action (stop would be illegal at point 0) and restarts it
    obs, r, term, trunc, info = env.step(np.array([t.stop, one]))
    assert env.episodes[0] is not stopped and env.episodes[0].step == 0
    assert r[0] == 0 and not term.any() and info == {}
    assert [ep.step for ep in env.episodes] == [0, 3]
    np.testing.assert_allclose(obs[0], sampler.observations(env.episodes[:1])[0])
    masks = env.action_masks()
    np.testing.assert_array_equal(masks, [only(t, *t.jumps), only(t, *t.jumps, t.stop)])

    while env.episodes[1].step < N_MAX - 1:
        env.step(np.array([one, one]))
    np.testing.assert_array_equal(env.action_masks()[1], only(t, t.stop))  # only stop
    last = env.episodes[1]
    obs, r, term, trunc, info = env.step(np.array([one, t.stop]))
    assert term[1] and last.nfe == N_MAX and info["final_episode"]["nfe"][1] == N_MAX
    assert info["final_episode"]["l"][1] == N_MAX
    # every NFE spent is counted: the live episodes' (the last one too) plus the first stopped
    assert env.total_nfe == sum(ep.nfe for ep in env.episodes) + stopped.nfe


def test_reset_options(sampler) -> None:
    """Partial reset (``reset_mask``, gymnasium's convention) and given (prompt, seed) tasks."""
    env = make_env(sampler, n=3)
    t = env.table
    with pytest.raises(RuntimeError, match="without a reset_mask must come first"):
        env.reset(options={"reset_mask": np.ones(3, bool)})
    obs0, _ = env.reset(options={"prompts": PROMPTS[:3], "seeds": [5, 6, 7]})
    assert [(ep.prompt, ep.seed) for ep in env.episodes] == list(
        zip(PROMPTS[:3], [5, 6, 7], strict=True)
    )
    env.step(np.array([t.jump(1)] * 3))
    kept = env.episodes[1]
    mask = np.array([True, False, True])
    obs, info = env.reset(options={"reset_mask": mask, "prompts": PROMPTS[:2], "seeds": [5, 9]})
    assert env.episodes[1] is kept and [ep.step for ep in env.episodes] == [0, 1, 0]
    assert (env.episodes[0].prompt, env.episodes[0].seed) == (PROMPTS[0], 5)
    np.testing.assert_allclose(obs[0], obs0[0])  # same (prompt, seed): same first observation
    with pytest.raises(ValueError, match="unknown reset option 'prompt'"):
        env.reset(options={"prompt": "x"})
    with pytest.raises(ValueError, match="go together"):
        env.reset(options={"seeds": [1, 2, 3]})
    with pytest.raises(ValueError, match="restarts 1 sub-env.*2 prompts"):
        env.reset(options={"reset_mask": mask[[1, 0, 1]], "prompts": PROMPTS[:2], "seeds": [1, 2]})
    with pytest.raises(ValueError, match=r"\(3,\) bool array"):
        env.reset(options={"reset_mask": [1, 0, 1]})


def test_record_episode_statistics_reports_the_envs_returns(sampler) -> None:
    """gymnasium's vector ``RecordEpisodeStatistics`` (which assumes next-step autoreset) reports
    each episode's return and length as the sum and count of the rewards the env produced."""
    env = make_env(sampler)
    wrapped = RecordEpisodeStatistics(env)
    rng = np.random.default_rng(0)
    wrapped.reset(seed=0)
    running, length = np.zeros(2), np.zeros(2, np.int64)
    restarting = np.zeros(2, bool)
    expected: list[tuple[float, int]] = []
    for _ in range(16):
        actions = [rng.choice(np.flatnonzero(m)) for m in env.action_masks()]
        _, r, term, trunc, info = wrapped.step(np.array(actions))
        assert (r[restarting] == 0).all() and not term[restarting].any()
        running[restarting], length[restarting] = 0.0, 0
        running[~restarting] += r[~restarting]
        length[~restarting] += 1
        for i in np.flatnonzero(term):
            expected.append((running[i], length[i]))
            assert info["_episode"][i] and info["_final_episode"][i]
            assert info["episode"]["l"][i] == info["final_episode"]["l"][i] == length[i]
            np.testing.assert_allclose(info["episode"]["r"][i], running[i], rtol=1e-6)
            np.testing.assert_allclose(info["final_episode"]["r"][i], running[i], rtol=1e-5)
        restarting = term | trunc
    assert len(expected) >= 3
    np.testing.assert_allclose(list(wrapped.return_queue), [r for r, _ in expected], rtol=1e-6)
    assert list(wrapped.length_queue) == [n for _, n in expected]


def test_sb3_adapter(sampler) -> None:
    venv = Sb3VecEnv(make_env(sampler))
    t = venv.env.table
    assert is_masking_supported(venv)
    venv.seed(0)
    obs = venv.reset()
    assert obs.shape == (2, venv.observation_space.shape[0])
    masks = get_action_masks(venv)  # what MaskablePPO calls: np.stack(env_method("action_masks"))
    assert masks.shape == (2, t.n) and masks.dtype == bool
    assert len(venv.env_method("action_masks", indices=[1])) == 1
    venv.step(np.array([t.jump(1), t.jump(1)]))
    obs, rewards, dones, infos = venv.step(np.array([t.stop, t.jump(2)]))
    assert rewards.dtype == np.float32 and dones.tolist() == [True, False]
    assert infos[0]["terminal_observation"].shape == obs.shape[1:]
    assert infos[0]["terminal_observation"][-2] == pytest.approx(2 / N_MAX)  # nfe_frac
    # SB3 autoresets in the same step: sub-env 0's next episode has started, obs is its first
    assert venv.env.episodes[0].step == 0 and not venv.env.episodes[0].done
    np.testing.assert_allclose(obs[0], venv.env.sampler.observations(venv.env.episodes[:1])[0])
    assert infos[0]["TimeLimit.truncated"] is False
    assert infos[0]["episode"]["nfe"] == 2 and infos[0]["episode"]["l"] == 2
    assert infos[1] == {}
    assert venv.env_is_wrapped(object) == [False, False]  # type: ignore[arg-type]
    with pytest.raises(AttributeError):
        venv.get_attr("no_such_attribute")


def test_refine_charges_its_nfe(tiny_models) -> None:
    """With a refine budget the env takes refine from the mask and charges what the sampler
    spent (refine_k re-denoise evaluations + the evaluation at the next point)."""
    from addiffusion.diffusion.backbone import load_pipeline
    from addiffusion.diffusion.sampler import SamplerSettings, StepwiseSampler
    from addiffusion.rewards.clip import ClipScorer

    pipe_dir, clip_dir = tiny_models
    settings = SamplerSettings(n_max=N_MAX, strides=STRIDES, warmup=1, refine_budget=1, refine_k=2)
    sampler = StepwiseSampler(
        load_pipeline(str(pipe_dir), "ddim", "cpu"), ClipScorer(str(clip_dir)), settings
    )
    env = SamplerVectorEnv(sampler, PROMPTS, 2, REWARDS, STATS, seed=0)
    t = env.table
    assert t.nfe_cost[t.refine] == settings.refine_k + 1
    env.reset(seed=0)
    assert not env.action_masks()[:, t.refine].any()  # warm-up
    env.step(np.array([t.jump(1), t.jump(1)]))
    assert env.action_masks()[:, t.refine].all()
    q1 = q_of(env)
    _, r, term, _, _ = env.step(np.array([t.refine, t.jump(2)]))
    refined, jumped = env.episodes
    assert (refined.step, refined.refines_used, jumped.step) == (2, 1, 3)
    delta = refined.nfe - 2
    assert delta == settings.refine_k + 1 and jumped.nfe == 3
    np.testing.assert_allclose(r, q_of(env) - q1 - REWARDS.c_nfe * np.array([delta, 1]), atol=1e-5)
    assert not env.action_masks()[0, t.refine]  # budget spent
    assert env.action_masks()[1, t.refine]


def test_allowed_actions_and_dropped_observation_parts(sampler) -> None:
    """An ablated env: masks ANDed with the allowed actions (the env refuses the others), the
    dropped observation parts zero in every observation returned, the rest unchanged."""
    t = sampler.table
    allowed = t.allowed("stop_only")  # jump-1 + stop
    drop = ["quality", "time"]
    env = SamplerVectorEnv(
        sampler, PROMPTS, 2, REWARDS, STATS, seed=0, allowed=allowed, observation_drop=drop
    )
    keep = env.layout.keep_mask(drop)
    obs, _ = env.reset(seed=0)
    for _ in range(N_MAX):
        full = sampler.observations(env.episodes)
        np.testing.assert_array_equal(obs[:, keep], full[:, keep])
        assert (obs[:, ~keep] == 0).all() and (full[:, ~keep] != 0).any()
        masks = env.action_masks()
        np.testing.assert_array_equal(masks, sampler.action_masks(env.episodes) & allowed)
        if sampler.action_masks(env.episodes)[0, t.jump(2)]:  # legal, not allowed
            with pytest.raises(ValueError, match="jump-2 is not allowed.*legal: jump-1"):
                env.step(np.array([t.jump(2), t.jump(1)]))
        obs, _, done, _, _ = env.step(np.where(masks[:, t.jump(1)], t.jump(1), t.stop))
        if done.all():
            break
    assert done.all()  # jump-1 to the last point, which allows stop


def test_allowed_actions_keep_the_legal_mask_where_none_is_left(sampler) -> None:
    """The offline policy's rule (``restrict_mask_np``): a row the allowed set would empty keeps
    its legal actions; a bad shape or an unknown observation part is refused."""
    t = sampler.table
    only_refine = np.array([a == t.refine for a in range(t.n)])
    env = SamplerVectorEnv(sampler, PROMPTS, 2, REWARDS, STATS, allowed=only_refine)
    env.reset(seed=0)
    np.testing.assert_array_equal(env.action_masks(), sampler.action_masks(env.episodes))
    with pytest.raises(ValueError, match=r"allowed must be a \(5,\) bool array"):
        SamplerVectorEnv(sampler, PROMPTS, 2, REWARDS, STATS, allowed=np.ones(3, bool))
    with pytest.raises(ValueError, match="unknown observation part 'colour'"):
        SamplerVectorEnv(sampler, PROMPTS, 2, REWARDS, STATS, observation_drop=["colour"])


def _fake_verifier(images: np.ndarray, prompts) -> np.ndarray:
    """A stand-in verifier in [0, 1] that moves as the image does (the shapes verifier scores
    the tiny model's images 0 throughout)."""
    return (images.astype(np.float32).mean(axis=(1, 2, 3)) / 255.0).astype(np.float32)


def test_final_episode_reports_the_hacking_watch_deltas(tiny_models, sampler) -> None:
    """``final_episode`` holds the final image's raw clip_score and verifier minus the first
    decision point's; without a verifier component its delta is NaN. The SB3 adapter passes
    both on in ``info["episode"]``."""
    from addiffusion.diffusion.backbone import load_pipeline
    from addiffusion.diffusion.sampler import SamplerSettings, StepwiseSampler
    from addiffusion.rewards.clip import ClipScorer

    pipe_dir, clip_dir = tiny_models
    verified = StepwiseSampler(
        load_pipeline(str(pipe_dir), "ddim", "cpu"),
        ClipScorer(str(clip_dir)),
        SamplerSettings(n_max=N_MAX, warmup=WARMUP, strides=STRIDES),
        extra_scorers={"verifier": _fake_verifier},
    )
    env = SamplerVectorEnv(verified, PROMPTS, 2, REWARDS, STATS, seed=0)
    t = env.table
    env.reset(seed=0)
    first = [dict(ep.components) for ep in env.episodes]
    env.step(np.array([t.jump(2), t.jump(1)]))
    _, _, done, _, infos = env.step(np.array([t.stop, t.stop]))
    assert done.all()
    final = infos["final_episode"]
    for i, ep in enumerate(env.episodes):  # the finished episodes (autoreset is next-step)
        for k in ("clip_score", "verifier"):
            want = ep.components[k] - first[i][k]
            assert final[f"{k}_delta"][i] == pytest.approx(want, abs=1e-6)
    assert np.abs(final["verifier_delta"]).max() > 0  # the fake verifier moved

    plain = make_env(sampler)
    plain.reset(seed=0)
    plain.step(np.array([t.jump(1), t.jump(1)]))
    _, _, _, _, infos = plain.step(np.array([t.stop, t.jump(1)]))
    assert np.isnan(infos["final_episode"]["verifier_delta"][0])
    assert np.isfinite(infos["final_episode"]["clip_score_delta"][0])

    venv = Sb3VecEnv(SamplerVectorEnv(verified, PROMPTS, 2, REWARDS, STATS, seed=0))
    venv.seed(0)
    venv.reset()
    venv.step(np.array([t.jump(1), t.jump(1)]))
    _, _, _, sb3_infos = venv.step(np.array([t.stop, t.stop]))
    assert {"r", "l", "nfe", "t", "clip_score_delta", "verifier_delta"} <= set(
        sb3_infos[0]["episode"]
    )
    assert isinstance(sb3_infos[0]["episode"]["verifier_delta"], float)
