"""``python -m addiffusion.worlds.shapes train --out models/shapes``."""

import sys

from addiffusion.cli import main

sys.exit(main(["shapes", *sys.argv[1:]]))
