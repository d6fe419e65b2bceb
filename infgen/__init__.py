"""InfGen."""
