"""The migration modes' drivers (one module per mode)."""
