"""Local mode (placeholder until implemented below)."""
