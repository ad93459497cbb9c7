"""The one MQTT connection of a process: paho-mqtt, driven by the asyncio loop.

paho-mqtt 2.x (Eclipse) is the client because its manual acknowledgements are
public API (``manual_ack=True``, ``Client.ack(mid, qos)``): a reading is
acknowledged to the broker only once it is committed. paho does no I/O of its
own here: its socket is watched by the loop (``on_socket_*`` callbacks, then
``loop_read``/``loop_write``), the way its documentation describes running it
in another event loop, so every callback runs on the loop's thread.

The session is persistent (``clean_start`` false, a day's expiry) under a client
id that survives restarts: what the broker had delivered but not seen
acknowledged comes back when the process reconnects, and a message that arrives
while no process is up waits in the session. A process that stops (``leave``)
while another stays subscribed ends its session once it has acknowledged everything
it took: the broker then drops it from the shared group, and hands what devices
publish next to the others. The last one keeps its subscription and its session:
what devices publish next waits in the broker for its client id.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import errno
import functools
import itertools
import logging
import select
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import unquote, urlsplit

import orjson
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from pulse.mqtt import dynsec

log = logging.getLogger(__name__)

# A message the broker delivered and this process did not acknowledge (it
# crashed, or lost the connection) comes back if it reconnects within this time.
SESSION_EXPIRY_S = 24 * 3600
# The reason code of a broker that closes a client whose roles changed (dynamic security).
ADMINISTRATIVE_ACTION = 0x98
# The largest packet the broker may send this process (MQTT 5 Maximum Packet Size, in
# CONNECT): it drops a message over it instead of delivering it. Well above a reading's
# 1 MiB (pulse.mqtt.intake.MAX_PAYLOAD; a message up to here is answered
# payload_too_large), and above the dynamic-security answers Pulse reads (a page of
# listClients: a thousand broker clients, a few hundred bytes each).
MAX_PACKET_SIZE = 16 * 1024 * 1024
KEEPALIVE_S = 30
CONNECT_TIMEOUT_S = 10.0
CONTROL_TIMEOUT_S = 10.0
# A process that stops has this long to settle what it took before it leaves the group.
LEAVE_TIMEOUT_S = 5.0
# A command waits this long for a connection being made (a reconnect) before failing.
CONTROL_WAIT_CONNECTED_S = 3.0
BACKOFF_MAX_S = 5.0
# A broker that cannot be reached (restarting) is tried this often at most: Mosquitto
# 2.0 restores no shared subscription after its restart, so what devices publish
# before Pulse subscribes again is lost, and devices reconnect within a second or two.
DOWN_RETRY_MAX_S = 0.5
# Connection errors (other than refused and reset) that a broker restarting gives.
UNREACHABLE = frozenset({errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN})
# While the broker stays unreachable, its warning is logged again this often at most.
DOWN_LOG_EVERY_S = 30.0
STABLE_S = 10.0


# Packets read in one turn of the loop, at most: the messages of one burst are then
# written together (MqttIntake.on_delivery) instead of one by one.
READ_BURST = 256


def _read_burst(client: paho.Client) -> None:
    """paho reads one packet per call: read on while the socket has more.

    Over TLS, bytes already read and decrypted wait in the SSL object, where no
    selector sees them: they count as more, and a burst cut short by READ_BURST
    goes on at the loop's next turn rather than at the next packet."""
    for _ in range(READ_BURST):
        client.loop_read()
        sock = client.socket()
        if sock is None:
            return
        if not (_decrypted(sock) or select.select([sock], [], [], 0)[0]):
            return
    if _decrypted(sock):
        asyncio.get_running_loop().call_soon(_read_burst, client)


def _decrypted(sock: Any) -> int:
    """Bytes an SSL socket has decrypted and not handed out yet (0 for a plain one)."""
    pending = getattr(sock, "pending", None)
    return int(pending()) if pending is not None else 0


class BrokerUnavailable(Exception):
    """The broker cannot be reached, or did not answer in time."""


class BrokerDown(BrokerUnavailable):
    """No connection could be made: nothing listens there (a broker restarting), or
    the network cannot reach it."""


def connect_failure(exc: OSError) -> BrokerUnavailable:
    """A failure to connect, as retried: refused or unreachable is a broker restarting
    (BrokerDown, tried again soon); a name that does not resolve or a certificate
    refused will not mend in half a second (BrokerUnavailable, backed off)."""
    down = isinstance(exc, ConnectionError) or exc.errno in UNREACHABLE
    return (BrokerDown if down else BrokerUnavailable)(f"cannot connect: {exc!r}")


@dataclasses.dataclass(frozen=True)
class BrokerUrl:
    host: str
    port: int
    username: str
    password: str
    # mqtts://: TLS 1.2 or later, the broker's certificate checked against the CAs of
    # ca_file (default: the system's) and its name against the host.
    tls: Any = dataclasses.field(default=None, repr=False)  # an ssl.SSLContext, or None

    @classmethod
    def parse(cls, url: str, ca_file: str | None = None) -> BrokerUrl:
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise ValueError(
                "an MQTT URL is mqtt://<admin user>:<password>@host:port (mqtts:// for TLS)"
            )
        if not parts.username or parts.password is None:
            raise ValueError("the MQTT URL must carry the dynamic-security admin's credentials")
        tls = None
        if parts.scheme == "mqtts":
            try:
                tls = ssl.create_default_context(cafile=ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise ValueError(f"PULSE_MQTT_CA_FILE={ca_file!r} cannot be used: {exc}") from exc
        return cls(
            parts.hostname,
            parts.port or (1883 if tls is None else 8883),
            unquote(parts.username),
            unquote(parts.password),
            tls,
        )


@dataclasses.dataclass(eq=False)
class Delivery:
    """One message from a device topic, to be settled once: acknowledged (QoS 1) when
    its connection is still the one it came on, in the order the messages came."""

    topic: str
    payload: bytes
    qos: int
    mid: int
    connection: int
    settled: bool = False
    # Sent with the retain flag: a retained message replayed to a new subscription (a
    # message published while subscribed arrives without it; Retain As Published is off).
    retain: bool = False


Handler = Callable[[Delivery], None]


class MqttLink:
    def __init__(
        self,
        url: BrokerUrl,
        client_id: str,
        subscriptions: list[str],
        *,
        receive_maximum: int = 1000,
        on_delivery: Handler,
        on_connected: Callable[[], None] = lambda: None,
    ) -> None:
        self._url = url
        self._client_id = client_id
        self._subscriptions = subscriptions
        self._receive_maximum = receive_maximum
        self._on_delivery = on_delivery
        self._on_connected = on_connected
        self._client: paho.Client | None = None
        self._connection = 0  # which connection a Delivery came on
        self._unsettled: collections.deque[Delivery] = collections.deque()
        self._control: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._correlation = f"{uuid.uuid4().hex[:12]}-"
        self._counter = itertools.count()
        self.connected = False
        self._up = asyncio.Event()
        self.subscribed = asyncio.Event()
        # The provisioner checked the broker's clients on this connection (Mqtt._reconcile).
        self.synced = False
        # Set while Pulse gives its own broker client a role: the broker then closes this
        # connection ("Administrative action"), as it does for any client whose roles change.
        self.expecting_kick = False
        self.reconnects = 0
        self.deliveries = 0  # device messages received, over every connection
        self._ended: asyncio.Future[Any] | None = None  # the connection's end
        self._unsubscribed: asyncio.Future[None] | None = None
        self._leaving = False
        # Stopping with the session kept: device messages are no longer taken.
        self._holding = False

    @property
    def username(self) -> str:
        return self._url.username

    @property
    def client_id(self) -> str:
        return self._client_id

    async def run(self) -> None:
        """Connect, and connect again whenever the connection ends; until ``leave``."""
        delay = 0.1
        down_since: float | None = None  # the first of the failures to connect in a row
        logged_at = 0.0
        self._leaving = self._holding = False
        while not self._leaving:
            started = time.monotonic()
            try:
                await self._connect_and_wait()
                down_since = None
            except BrokerDown as exc:
                if down_since is None or started - logged_at >= DOWN_LOG_EVERY_S:
                    down_since = down_since or started
                    logged_at = started
                    log.warning(
                        "MQTT broker %s:%d: %s (down for %.0f s; trying every %g s)",
                        self._url.host, self._url.port, exc, started - down_since,
                        DOWN_RETRY_MAX_S,
                    )  # fmt: skip
            except BrokerUnavailable as exc:
                down_since = None
                log.warning("MQTT broker %s:%d: %s", self._url.host, self._url.port, exc)
            # Back off again only after a connection that lasted: one the broker keeps
            # closing (another process with this client id) is not retried ten times a second.
            # One that could not be made is tried again soon: the broker may be back.
            if time.monotonic() - started > STABLE_S:
                delay = 0.1
            await asyncio.sleep(min(delay, DOWN_RETRY_MAX_S) if down_since else delay)
            delay = min(delay * 2, BACKOFF_MAX_S)
            self.reconnects += 1

    def settle(self, delivery: Delivery) -> None:
        """``delivery`` is done with (committed, or answered as bad input): acknowledge it,
        after every message that came before it on its connection."""
        delivery.settled = True
        while self._unsettled and self._unsettled[0].settled:
            done = self._unsettled.popleft()
            if done.qos and self._client is not None:
                self._client.ack(done.mid, done.qos)

    def stale(self, delivery: Delivery) -> bool:
        """Its connection has ended: the broker will deliver it again, so it may be dropped."""
        return delivery.connection != self._connection or not self.connected

    async def leave(self, idle: Callable[[], Awaitable[None]], *, end_session: bool = True) -> bool:
        """The process stops; whether the session was ended.

        With ``end_session`` (another process stays in the group): take no more messages
        (unsubscribe), let ``idle`` write and settle those that came, and once a round
        trip to the broker brings no more, DISCONNECT ending the session (Session Expiry
        Interval 0). The broker then drops this process from the shared group: a client
        id that never comes back strands nothing. Without it (the last process of the
        group), the subscription and the session stay, as after a crash: the broker
        keeps what devices publish next for this client id (with no subscriber left it
        would drop it). The messages that arrive from now on are left unacknowledged
        (they come again when this client id connects), those taken before are settled.
        What cannot be settled within LEAVE_TIMEOUT_S (the database is away) keeps the
        session either way: it comes back when this client id connects again."""
        client, ended = self._client, self._ended
        if client is None or ended is None or not self.connected:
            return False
        self._leaving = True
        self._holding = not end_session
        settled = False
        try:
            async with asyncio.timeout(LEAVE_TIMEOUT_S):
                if end_session:
                    self._unsubscribed = asyncio.get_running_loop().create_future()
                    client.unsubscribe(self._subscriptions)
                    await self._unsubscribed
                while not settled:
                    await idle()
                    if self._holding:
                        break  # what the broker sends now is not taken
                    seen = self.deliveries
                    # The broker sends what the acknowledgements released (messages it held
                    # back beyond the Receive Maximum) before it answers a later command.
                    await self.control([dynsec.get_client(self.username)])
                    settled = self.deliveries == seen and not self._unsettled
                settled = True
        except (TimeoutError, BrokerUnavailable) as exc:
            log.warning(
                "MQTT: stopping with messages not yet settled (%r): the session is kept, "
                "and they come back when client id %s connects again",
                exc,
                self._client_id,
            )
        drained = settled and end_session
        properties = Properties(PacketTypes.DISCONNECT)  # type: ignore[no-untyped-call]
        if drained:
            properties.SessionExpiryInterval = 0
        client.disconnect(properties=properties)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CONTROL_TIMEOUT_S):
                await asyncio.shield(ended)  # the DISCONNECT written
        if drained:
            log.info("MQTT: left the shared subscription; session %s ended", self._client_id)
        elif settled:
            log.info(
                "MQTT: session %s kept: what devices publish waits in the broker until "
                "that client id connects again",
                self._client_id,
            )
        return drained

    def publish(self, topic: str, payload: bytes, qos: int = 0) -> None:
        """Send, if connected; otherwise drop (nothing published here needs to survive)."""
        if self._client is not None and self.connected:
            self._client.publish(topic, payload, qos)

    async def control(self, commands: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Send dynamic-security commands; each one's response, in order."""
        if not self.connected:
            try:
                async with asyncio.timeout(CONTROL_WAIT_CONNECTED_S):
                    await self._up.wait()
            except TimeoutError:
                raise BrokerUnavailable("not connected") from None
        assert self._client is not None
        loop = asyncio.get_running_loop()
        futures = []
        sent = []
        for command in commands:
            key = f"{self._correlation}{next(self._counter)}"
            future: asyncio.Future[dict[str, Any]] = loop.create_future()
            self._control[key] = future
            futures.append(future)
            sent.append({**command, "correlationData": key})
        try:
            self._client.publish(dynsec.CONTROL, orjson.dumps({"commands": sent}), qos=1)
            async with asyncio.timeout(CONTROL_TIMEOUT_S):
                return list(await asyncio.gather(*futures))
        except TimeoutError:
            raise BrokerUnavailable("no answer from the dynamic-security plugin") from None
        finally:
            for command in sent:
                self._control.pop(command["correlationData"], None)

    async def _connect_and_wait(self) -> None:
        loop = asyncio.get_running_loop()
        loop_thread = threading.get_ident()
        ended = loop.create_future()
        self._ended = ended
        connack: asyncio.Future[None] = loop.create_future()
        self._connection += 1
        self._unsettled.clear()
        self.subscribed.clear()

        def on_loop(call: Callable[[], object]) -> None:
            # paho calls back from connect(), which runs in a worker thread.
            if threading.get_ident() == loop_thread:
                call()
            else:
                loop.call_soon_threadsafe(call)

        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self._client_id,
            protocol=paho.MQTTv5,
            manual_ack=True,
        )
        client.username_pw_set(self._url.username, self._url.password)
        if self._url.tls is not None:
            client.tls_set_context(self._url.tls)

        def on_socket_open(c: paho.Client, _u: Any, sock: Any) -> None:
            # Acknowledgements and commands are small: send them at once (paho leaves
            # Nagle's algorithm on).
            with contextlib.suppress(OSError, AttributeError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            on_loop(functools.partial(loop.add_reader, sock, _read_burst, c))

        client.on_socket_open = on_socket_open
        client.on_socket_close = lambda _c, _u, sock: on_loop(
            functools.partial(loop.remove_reader, sock)
        )
        client.on_socket_register_write = lambda c, _u, sock: on_loop(
            functools.partial(loop.add_writer, sock, c.loop_write)
        )
        client.on_socket_unregister_write = lambda _c, _u, sock: on_loop(
            functools.partial(loop.remove_writer, sock)
        )

        def on_connect(
            c: paho.Client, _u: Any, _f: Any, reason: ReasonCode, _p: Properties | None
        ) -> None:
            if connack.done():
                return
            if reason.is_failure:
                connack.set_exception(BrokerUnavailable(f"connection refused: {reason}"))
                return
            connack.set_result(None)

        def on_disconnect(
            _c: paho.Client, _u: Any, _f: Any, reason: ReasonCode, _p: Properties | None
        ) -> None:
            if not connack.done():
                connack.set_exception(BrokerUnavailable(f"disconnected: {reason}"))
            if not ended.done():
                ended.set_result(reason)

        def on_subscribe(
            _c: paho.Client, _u: Any, _mid: int, reasons: list[ReasonCode], _p: Properties | None
        ) -> None:
            if any(reason.is_failure for reason in reasons):
                log.error("MQTT subscription refused: %s", ", ".join(map(str, reasons)))
            else:
                self.subscribed.set()

        def on_unsubscribe(
            _c: paho.Client, _u: Any, _mid: int, _r: list[ReasonCode], _p: Properties | None
        ) -> None:
            if self._unsubscribed is not None and not self._unsubscribed.done():
                self._unsubscribed.set_result(None)

        client.on_connect = on_connect
        client.on_disconnect = on_disconnect
        client.on_subscribe = on_subscribe
        client.on_unsubscribe = on_unsubscribe
        client.on_message = self._on_message

        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = SESSION_EXPIRY_S
        properties.ReceiveMaximum = self._receive_maximum
        properties.MaximumPacketSize = MAX_PACKET_SIZE
        housekeeping = asyncio.create_task(self._housekeeping(client))
        try:
            try:
                await loop.run_in_executor(
                    None,
                    functools.partial(
                        client.connect,
                        self._url.host,
                        self._url.port,
                        keepalive=KEEPALIVE_S,
                        clean_start=False,
                        properties=properties,
                    ),
                )
                async with asyncio.timeout(CONNECT_TIMEOUT_S):
                    await connack
            except TimeoutError as exc:
                raise BrokerUnavailable(f"cannot connect: {exc!r}") from None
            except OSError as exc:
                raise connect_failure(exc) from None
            self._client = client
            self.connected = True
            self._up.set()
            log.info(
                "MQTT connected to %s:%d as %s", self._url.host, self._url.port, self._client_id
            )
            client.subscribe(dynsec.RESPONSE, qos=0)
            # Not Retain As Published: a message comes with the retain flag only when it is a
            # retained one replayed to this subscription (MqttIntake refuses those).
            options = SubscribeOptions(qos=1, retainAsPublished=False)
            client.subscribe([(topic, options) for topic in self._subscriptions])
            self._on_connected()
            reason = await ended
            if self._leaving:
                log.info("MQTT connection closed: %s", reason)
            elif self.expecting_kick and getattr(reason, "value", None) == ADMINISTRATIVE_ACTION:
                log.info("MQTT connection ended to take Pulse's new role: %s", reason)
            else:
                log.warning("MQTT connection ended: %s", reason)
        finally:
            self.connected = False
            self._ended = None
            self._up.clear()
            self.synced = False
            self.expecting_kick = False
            self.subscribed.clear()
            self._client = None
            housekeeping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await housekeeping
            for future in self._control.values():
                if not future.done():
                    future.set_exception(BrokerUnavailable("the connection ended"))
            with contextlib.suppress(Exception):
                client.disconnect()
            sock = client.socket()
            if sock is not None:
                with contextlib.suppress(Exception):
                    loop.remove_reader(sock)
                    loop.remove_writer(sock)

    async def _housekeeping(self, client: paho.Client) -> None:
        """paho's timers: keepalive pings, and noticing a broker that stopped answering."""
        while True:
            await asyncio.sleep(1)
            client.loop_misc()

    def _on_message(self, _c: paho.Client, _u: Any, message: paho.MQTTMessage) -> None:
        if message.topic == dynsec.RESPONSE:
            self._on_control_response(bytes(message.payload))
            return
        if self._holding:
            return  # never acknowledged: the session delivers it again at the next connection
        self.deliveries += 1
        delivery = Delivery(
            message.topic,
            bytes(message.payload),
            message.qos,
            message.mid,
            self._connection,
            retain=bool(message.retain),
        )
        if message.qos:
            self._unsettled.append(delivery)
        self._on_delivery(delivery)

    def _on_control_response(self, payload: bytes) -> None:
        try:
            responses = orjson.loads(payload)["responses"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return
        for response in responses:
            future = self._control.get(str(response.get("correlationData")))
            if future is not None and not future.done():
                future.set_result(response)
