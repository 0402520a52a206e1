"""aloe: a command-line toolkit for building medical vision-language models."""

__version__ = "0.1.0"
