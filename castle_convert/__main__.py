"""`python -m castle_convert ...` (and `accelerate launch -m castle_convert ...`) == the CLI."""

from castle_convert.cli import main

if __name__ == "__main__":
    main()
