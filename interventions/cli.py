"""Command-line subcommands of the ``interventions`` package."""
