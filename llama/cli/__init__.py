"""The `llama` command: its parser, options, subcommands, logging and error
reporting. Nothing else in the package imports it."""
