from manidp_cli.cli import main

main()
