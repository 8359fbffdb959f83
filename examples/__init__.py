"""Runnable examples: ``python -m examples.keras_fit`` (``torch_loop``, ``jax_loop``) from the
repository root. See examples/README.md."""
