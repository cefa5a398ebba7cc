"""`python -m zobench …` and `torchrun … -m zobench …`: the zobench command."""

import sys

from .cli import main

sys.exit(main())
