"""Servers measured side by side with inslytic-fast (same API, or the bare ceiling)."""
