"""Engines run the same algorithm core; they differ only in how clients are reached."""
