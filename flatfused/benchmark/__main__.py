"""``python -m flatfused.benchmark``: the same as ``flatfused bench``."""
from .cli import main

raise SystemExit(main())
