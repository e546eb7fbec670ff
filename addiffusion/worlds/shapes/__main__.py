"""``python -m addiffusion.worlds.shapes train --out assets/shapes``."""

from addiffusion.worlds.shapes.cli import main

main(["shapes", *__import__("sys").argv[1:]])
