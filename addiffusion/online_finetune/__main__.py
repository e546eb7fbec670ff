import sys

from addiffusion.cli import main

sys.exit(main(["online-finetune", *sys.argv[1:]]))
