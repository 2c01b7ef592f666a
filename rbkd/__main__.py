"""`python -m rbkd`: the same command line as the `rbkd` script (prog name "rbkd")."""

from rbkd.cli.app import main

if __name__ == "__main__":
    main()
