"""``python -m r1ray``: the CLI where the ``r1ray`` script is not on PATH (code shipped by Ray)."""
import sys

from .controllers.cli import main

sys.exit(main())
