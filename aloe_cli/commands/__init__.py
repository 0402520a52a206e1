"""One module per subcommand. Each is thin: options -> core call -> summary."""
