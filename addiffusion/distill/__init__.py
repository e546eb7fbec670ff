"""On-policy distillation of a teacher diffusion pipeline into a student that shares its
scheduler and timesteps (pairs and rollouts, losses, training, evaluation, survey export)."""
