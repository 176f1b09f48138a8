"""Helpers shared by the tunnel tests, with or without the Go peers.

``tests/`` is on ``sys.path`` when pytest collects (``tests/`` has no ``__init__.py``), so
both ``tests/test_*.py`` and ``tests/interop/`` import these as ``support.<module>``.
"""
