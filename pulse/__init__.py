"""Pulse: real-time telemetry streaming for multi-tenant IoT fleets."""

__version__ = "0.1.0"
