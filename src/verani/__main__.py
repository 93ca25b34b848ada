"""Internal: ``python -m verani`` runs the CLI."""

from .cli import main

main()
