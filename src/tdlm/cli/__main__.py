"""``python -m tdlm.cli``: the ``tdlm`` command."""
import sys

from . import main

sys.exit(main())
