"""`python -m somelvlm.train ...` and `accelerate launch -m somelvlm.train ...` (= `somelvlm finetune`)."""

import sys

from . import main

sys.exit(main())
