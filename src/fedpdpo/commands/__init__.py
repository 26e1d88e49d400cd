"""CLI subcommands: one module each, exposing ``register(subparsers)``; ``fedpdpo.cli`` lists them."""
