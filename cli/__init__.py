"""The `rbkd` command line (Typer): one module per command group, joined in `rbkd.cli.app`."""
