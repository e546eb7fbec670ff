"""Constants shared by the online_finetune tests and their conftest (a unique module name, so
that it cannot clash with other test folders' helpers)."""

N_MAX = 4
WARMUP = 1
PROMPTS = ["a red circle", "two blue squares", "a green triangle", "three yellow circles"]
STATS = {"clip_score": {"mean": 0.05, "std": 0.1}, "stability": {"mean": 0.6, "std": 0.3}}
