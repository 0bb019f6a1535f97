#!/usr/bin/env python
"""Thin wrapper: `python scripts/convert_checkpoint.py ARGS` == `somelvlm convert ARGS`."""

import sys

from somelvlm.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
