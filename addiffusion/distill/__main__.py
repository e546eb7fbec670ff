import sys

from addiffusion.cli import main

sys.exit(main(["distill", *sys.argv[1:]]))
