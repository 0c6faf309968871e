"""The ``afina`` command line."""
