"""The `longlive` command: one entry point, one module per subcommand."""
