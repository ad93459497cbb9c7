"""What a `pulse serve` process loads: not the client's HTTP and WebSocket libraries, nor
the NATS client unless PULSE_BUS_URL is set, nor the MQTT client (paho) unless
PULSE_MQTT_URL is."""

from __future__ import annotations

import subprocess
import sys

LOADED = """
import sys
from pulse.cli import build_parser
from pulse.app import create_app
from pulse.config import Settings
from pulse import serving
build_parser().parse_args(["serve"])
create_app(Settings(jwt_secret="x" * 40))
libraries = ("httpx", "websockets", "pgserver", "nats", "paho")
print(" ".join(sorted(m for m in libraries if m in sys.modules)))
"""


def test_a_server_process_does_not_load_the_clients_libraries() -> None:
    """Issue #19 item 8: about 9 MB of a serving process's memory (74.7 -> 69.5 MB RSS)."""
    loaded = subprocess.run(
        [sys.executable, "-c", LOADED], capture_output=True, text=True, check=True
    ).stdout.split()
    assert loaded == []
