"""Constants shared by the online_finetune tests and their conftest (a unique module name, so
that it cannot clash with other test folders' helpers)."""

N_MAX = 6
WARMUP = 1
STRIDES = (1, 2, 4)
"""Jump strides of the test MDP: its action table is jump-1, jump-2, jump-4, stop, refine."""
PROMPTS = ["a red circle", "two blue squares", "a green triangle", "three yellow circles"]
STATS = {"clip_score": {"mean": 0.05, "std": 0.1}, "stability": {"mean": 0.6, "std": 0.3}}
OBS_DIM = 85
"""Observation dim of the tiny CLIP's MDP: 32 image + 32 text + 16 time + 5 quality."""
