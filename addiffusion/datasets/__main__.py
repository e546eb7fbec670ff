import sys

from addiffusion.cli import main

sys.exit(main(["datasets", *sys.argv[1:]]))
