"""Small-batch normalization: the norm library (``mabn.norms``: MABN, BN, GN, BRN, SyncBN, GN+WS, EvoNorm-S0,
FRN, CBN) and the experiments around it (see README.md). ``__version__`` is what every record carries."""

__version__ = "0.2.0"  # the same as pyproject.toml's (tests/test_project.py); CHANGELOG.md says what changed
