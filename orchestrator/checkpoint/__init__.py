"""Sharded checkpoints under an atomic commit protocol (see commit.py for the order of a save)."""
