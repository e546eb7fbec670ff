import sys

from addiffusion.cli import main

sys.exit(main(["eval", *sys.argv[1:]]))
