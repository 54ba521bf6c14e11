"""Subcommands of the ``sinkhorn-hf`` console script (see :mod:`sinkhorn_hf.cli`)."""
