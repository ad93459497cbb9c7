"""Telemetry history: rollups kept from the committed rows, and the reads of the history API."""
