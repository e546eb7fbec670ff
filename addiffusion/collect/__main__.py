import sys

from addiffusion.cli import main

sys.exit(main(["collect", *sys.argv[1:]]))
