"""`python -m somelvlm` is the `somelvlm` command."""

import sys

from .cli import main

sys.exit(main())
