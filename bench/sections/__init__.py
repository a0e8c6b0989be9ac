"""The sections of bench/devices.py, one module per thing measured (base: what they share)."""
