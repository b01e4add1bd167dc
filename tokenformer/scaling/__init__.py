"""Incremental scaling by parameter tokens: growing (exact or official), shrinking, and training
only the new tokens."""
