"""Shared by both tiers: makes tests/ importable (clirunner, ocifixtures, terminal)."""
