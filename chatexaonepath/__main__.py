"""`python -m chatexaonepath` runs the CLI."""

from .cli import main

main()
