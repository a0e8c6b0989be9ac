"""Shared by both tiers: makes tests/ importable (ocifixtures, terminal)."""
