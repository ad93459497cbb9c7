"""Devices over MQTT: the second intake (PULSE_MQTT_URL).

``topics`` names every topic and broker identity, ``dynsec`` writes the broker's
dynamic-security commands (both without I/O); ``link`` is the one connection
(paho-mqtt on the asyncio loop), ``intake`` turns messages into
``pulse.ingest`` items and acknowledges them once committed, and ``provision``
keeps the broker's device credentials in step with the devices.
"""
