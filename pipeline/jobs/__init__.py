"""Whole jobs the `anoclip` commands run: each takes plain arguments, does the work, and returns a summary the
command prints."""
