"""Process entry points: each sub-command of `anoclip` wires library parts together."""
