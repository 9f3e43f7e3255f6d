"""Bare servers on the same stack as the gateway, to compare it with."""
