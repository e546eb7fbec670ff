"""CLI home of the ``backbone`` stage; the code lives in :mod:`addiffusion.diffusion`."""
