"""Run outputs and terminal progress."""
