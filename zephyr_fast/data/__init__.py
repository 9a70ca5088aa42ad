"""Data layer: load -> validate -> chat template -> tokenise -> pack into PackedBatch."""
