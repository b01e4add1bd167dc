"""The `tokenformer` subcommands, one module each: `arguments(parser)` declares a command's options
and `main(args)`, whose docstring is its `--help` text, runs it (see `tokenformer.__main__`)."""
