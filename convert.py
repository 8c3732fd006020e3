#!/usr/bin/env python
"""Thin script: `python convert.py ARGS...` is the same as `castle-convert ARGS...`."""

from castle_convert.cli import main

if __name__ == "__main__":
    main()
