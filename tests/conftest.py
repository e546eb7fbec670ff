"""Test-wide settings. The tests use tiny models, which run fastest on one thread; more threads
only contend with each other (and with anything else) on a small shared CI machine."""

import torch

torch.set_num_threads(1)
