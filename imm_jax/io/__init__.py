"""Readers of files made by other frameworks: torch pickles (restricted, code-free)."""
