"""Test fixtures for aloe (never imported by the CLI's real code paths)."""
