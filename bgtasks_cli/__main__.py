from bgtasks_cli.cli import main

main()
