"""The `bgtasks` command-line interface."""
