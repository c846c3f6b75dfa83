"""The CLI's commands by group; `bgtasks_cli.cli` registers them on the app."""
