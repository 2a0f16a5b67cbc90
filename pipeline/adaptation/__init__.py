"""What a line learns from its own frames, in one lifecycle (`lifecycle`: follow the registry's current version,
skip a bad one once, publish or refuse a refreshed candidate) over one version registry (`registry`) and one
artifact format (`artifacts`). The kinds: TTA adapters (`tta/`) and patch-memory banks (`memory/`); both gates
paste their known positives from `synthetic`."""
