"""Small-batch normalization experiments: MABN, BN, GN, BRN, SyncBN (see README.md)."""

__version__ = "0.1.0"
