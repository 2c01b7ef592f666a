"""The `rbkd` command line (Typer): one module per command group, joined in `rbkd.cli.app`.

This folder sits at the top of the repository (cli/) but is installed as `rbkd.cli`:
pyproject.toml's scikit-build-core `wheel.packages` maps "rbkd/cli" = "cli" (and the editable
install redirects the same name here), so `import rbkd.cli.app` reads cli/app.py. There is no
top-level `cli` module; import it as `rbkd.cli`.

What the command groups share, one idea a module:

    typer_app    the house Typer app (`new_app`), its one-line usage errors and help layout
    options      the options shared by the commands (`--T`, `--device`, ...), their choices
                 and the list-valued ones' parsing (`--classes 0,3,6`)
    usage        option values checked before any work: a bad one is a usage error (exit 2)
    config_file  `--config FILE`, and the invocation config.json records
    errors       the error boundary (`handle_errors`): one line, exit code 1
    interrupts   Ctrl-C and SIGTERM: what is kept and the command that resumes it
    threads      torch's thread count (`start_compute`)
    consoles     stdout for results, stderr for the rest
    output       tables and --json
    text         untrusted text made safe for the terminal

`rbkd --help` imports only the app, its help and its error boundary; a command's module loads
when the command runs or shows its own help, and torch only when it works.
"""
