"""Fuzz targets: bytes a process reads back from memory or files it does not control.

Each target module builds real samples (with the real writers), mutates them, and checks
properties (``check``); ``tests/unit/test_*_fuzz.py`` run them under hypothesis in CI, and
``python -m fuzz`` runs them for as many inputs as asked.
"""
