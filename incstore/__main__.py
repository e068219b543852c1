"""Entry point for `python -m incstore`."""

from incstore.cli import main

main()
