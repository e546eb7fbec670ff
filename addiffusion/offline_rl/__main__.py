import sys

from addiffusion.cli import main

sys.exit(main(["offline-rl", *sys.argv[1:]]))
