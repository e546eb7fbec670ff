import sys

from addiffusion.cli import main

sys.exit(main(["report", *sys.argv[1:]]))
