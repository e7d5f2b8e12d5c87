"""`python -m minipeft ...`: the same as the `minipeft` command (cli.py)."""

from .cli import main

main()
