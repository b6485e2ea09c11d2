"""``python -m flatfused.benchmark``: the same as ``flatfused bench``."""
import sys

from flatfused.cli import main

# Through the dispatcher, which reports a refused input in one line with exit status 2.
sys.exit(main(["bench", *sys.argv[1:]]))
