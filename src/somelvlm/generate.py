"""`python -m somelvlm.generate ARGS` = `somelvlm generate ARGS`, for launchers that take a module:

    accelerate launch --num_processes 8 -m somelvlm.generate --model DIR --input t.jsonl --output a.jsonl
"""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main(["generate", *sys.argv[1:]]))
