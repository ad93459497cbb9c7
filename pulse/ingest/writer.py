"""The write path: authenticate, reserve ids, insert, mark devices seen, commit."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar

import asyncpg

from pulse.auth.device_tokens import device_token_matches
from pulse.db.database import Database
from pulse.db.queries import load_queries
from pulse.errors import INVALID_DEVICE_TOKEN, UNKNOWN_DEVICE
from pulse.ingest.gates import KeyedLocks
from pulse.ingest.model import Accepted, Outcome, Rejected, Submission
from pulse.ingest.validation import Reading

Q = load_queries(__package__)

Device = tuple[str, str]  # (tenant_id, device_id)
R = TypeVar("R")

# Writes of at least this many messages are checked before they queue for
# their tenants' gates (TelemetryWriter._check).
CHECK_AHEAD_FROM = 32

# Admission control, asked once per device of a write with how many of its messages
# authenticated: how many of them it admits (the first ones), and the refusal for
# the others (rate_limited, with the seconds to wait), None when all are admitted.
Admit = Callable[[Device, int], tuple[int, Rejected | None]]


@dataclasses.dataclass(slots=True)  # not frozen: see validation.Reading
class WrittenEvent:
    tenant_id: str
    id: int
    device_id: str
    reading: Reading


@dataclasses.dataclass(frozen=True)
class Written:
    """What one transaction wrote, handed to the hooks before it commits."""

    events: list[WrittenEvent]
    seen: list[Device]
    came_online: list[Device]


class TransactionHook(Protocol):
    """Runs inside the write transaction, after the rows are in, before the commit.

    This is where alert rules are evaluated, so that an alert and the reading
    that raised it commit together. Raising rolls the whole write back.
    """

    async def __call__(self, conn: asyncpg.Connection, written: Written) -> None: ...


class TelemetryWriter:
    """Writes readings and heartbeats; one transaction per call to ``write``."""

    def __init__(
        self,
        db: Database,
        *,
        admit: Admit | None = None,
        hooks: Sequence[TransactionHook] = (),
        group_commit: bool = True,
    ) -> None:
        self._db = db
        self._admit = admit
        self._hooks = tuple(hooks)
        self._group_commit = group_commit
        # Writes waiting for the gates of the same tenants, to be committed together.
        # Each with whether its checks were made already (_check).
        self._waiting: dict[
            frozenset[str],
            list[tuple[Sequence[Submission], bool, asyncio.Future[list[Outcome]]]],
        ] = {}
        # Writers of one tenant commit one at a time anyway (the tenant row
        # lock); queueing them here instead of inside PostgreSQL keeps a busy
        # tenant from holding every pooled connection while it waits, which
        # would stall the other tenants.
        self._tenant_gates = KeyedLocks()
        # Writes waiting for their tokens and rates to be checked (_check).
        self._unchecked: list[
            tuple[Sequence[Submission], asyncio.Future[list[Outcome | None]]]
        ] = []
        self._checking: asyncio.Task[None] | None = None

    async def write(self, submissions: Sequence[Submission]) -> list[Outcome]:
        """Write every submission that authenticates and is admitted; one outcome each, in order.

        Readings of any number of devices and tenants share one transaction;
        heartbeats (``reading is None``) only mark their device as seen.
        """
        if not submissions:
            return []
        tenants = frozenset(s.tenant_id for s in submissions if s.reading is not None)
        if not (self._group_commit and tenants):
            async with self._tenant_gates.hold(tenants):
                return await self._commit(submissions)
        if len(submissions) < CHECK_AHEAD_FROM:
            return await self._write_grouped(tenants, submissions, checked=False)
        checked = await self._check(submissions)
        admitted = [s for s, outcome in zip(submissions, checked, strict=True) if outcome is None]
        tenants = frozenset(s.tenant_id for s in admitted if s.reading is not None)
        written = iter(
            await self._write_grouped(tenants, admitted, checked=True) if admitted else []
        )
        return [next(written) if outcome is None else outcome for outcome in checked]

    async def _check(self, submissions: Sequence[Submission]) -> list[Outcome | None]:
        """The first stage of a group commit for large writes: tokens and rates,
        checked before the write queues for its tenants' gates. None admits.

        Checks queued while one runs are made together by the next, in one
        query, on a connection of their own: so they overlap the transaction
        of the group ahead instead of lengthening the tenants' serial section
        (about an eighth of it for 1000-row groups). A small write is checked
        inside its group's transaction instead, where the check costs no
        round trip of its own.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Outcome | None]] = loop.create_future()
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._unchecked.append((submissions, future))
        if self._checking is None:
            self._checking = loop.create_task(self._check_queued())
        return await future

    async def _check_queued(self) -> None:
        try:
            while self._unchecked:
                group, self._unchecked = self._unchecked, []
                everything = [s for subs, _ in group for s in subs]
                checking = asyncio.get_running_loop().create_future()
                try:
                    async with self._db.connection() as conn:
                        checking.set_result(await self._authenticate(conn, everything))
                except asyncio.CancelledError:
                    checking.cancel()  # the server is stopping: so are the callers
                    raise
                except Exception as exc:
                    checking.set_exception(exc)
                finally:
                    _settle(group, checking)
        finally:
            self._checking = None

    async def _write_grouped(
        self, tenants: frozenset[str], submissions: Sequence[Submission], *, checked: bool
    ) -> list[Outcome]:
        """Group commit: the writes for the same tenants that queue for their gates
        while a transaction runs are all committed by the next one, together.

        A tenant's writers commit one at a time anyway (its counter row), so a
        group costs about what one write costs. Each caller is answered only
        once the group's transaction has committed, with its own outcomes.
        Writes whose tenants differ but overlap are not merged; the gates still
        order them.
        """
        future: asyncio.Future[list[Outcome]] = asyncio.get_running_loop().create_future()
        # A caller that went away leaves its future unread: that is not an error.
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._waiting.setdefault(tenants, []).append((submissions, checked, future))
        async with self._tenant_gates.hold(tenants):
            if not future.done():
                group = self._waiting.pop(tenants)
                everything = [s for subs, _, _ in group for s in subs]
                prechecked = [was for subs, was, _ in group for _ in subs]
                commit = asyncio.get_running_loop().create_task(
                    self._commit(everything, prechecked)
                )
                callers = [(subs, waiter) for subs, _, waiter in group]
                commit.add_done_callback(lambda done: _settle(callers, done))
                # Shielded: if this caller goes away, the others still get their answer.
                # Its own answer, or error, comes through its future like theirs.
                with contextlib.suppress(Exception):
                    await asyncio.shield(commit)
        return await future

    async def _commit(
        self, submissions: Sequence[Submission], prechecked: Sequence[bool] = ()
    ) -> list[Outcome]:
        """One transaction. ``prechecked[i]``: submission i passed its checks already."""
        async with self._db.transaction() as conn:
            return await self._write_in(conn, submissions, prechecked)

    async def _write_in(
        self,
        conn: asyncpg.Connection,
        submissions: Sequence[Submission],
        prechecked: Sequence[bool],
    ) -> list[Outcome]:
        outcomes: list[Outcome | None] = [None] * len(submissions)
        unchecked = [i for i in range(len(submissions)) if not (prechecked and prechecked[i])]
        if unchecked:
            checked = await self._authenticate(conn, [submissions[i] for i in unchecked])
            for i, outcome in zip(unchecked, checked, strict=True):
                outcomes[i] = outcome
        admitted = [i for i, outcome in enumerate(outcomes) if outcome is None]
        for i in await self._repeated(conn, submissions, admitted):
            outcomes[i] = Accepted(None, duplicate=True)
        readings = [
            i for i in admitted if outcomes[i] is None and submissions[i].reading is not None
        ]
        ids = await self._insert(conn, [submissions[i] for i in readings])
        events: list[WrittenEvent] = []
        for i, event_id in zip(readings, ids, strict=True):
            submission = submissions[i]
            if event_id is None:
                outcomes[i] = Rejected(UNKNOWN_DEVICE, _unknown(submission.device))
                continue
            outcomes[i] = Accepted(event_id)
            events.append(
                WrittenEvent(
                    submission.tenant_id, event_id, submission.device_id, _reading(submission)
                )
            )
        seen = list(
            dict.fromkeys(
                submissions[i].device for i in admitted if not isinstance(outcomes[i], Rejected)
            )
        )
        came_online = await self._touch(conn, seen)
        written = Written(events=events, seen=seen, came_online=came_online)
        # The seam for alert rules: they see the rows before anyone else can.
        for hook in self._hooks:
            await hook(conn, written)
        # What is still undecided here is an admitted heartbeat.
        return [Accepted(None) if outcome is None else outcome for outcome in outcomes]

    async def _authenticate(
        self, conn: asyncpg.Connection, submissions: Sequence[Submission]
    ) -> list[Outcome | None]:
        """Reject unknown devices, wrong tokens and messages over the rate; None admits.

        Checked per device, not per message: a batch repeats each device's token,
        and admission takes all of a device's messages at once.
        """
        devices = list(dict.fromkeys(s.device for s in submissions))
        rows = await conn.fetch(
            Q["device_token_hashes"], [d[0] for d in devices], [d[1] for d in devices]
        )
        hashes = {(row["tenant_id"], row["device_id"]): row["token_hash"] for row in rows}
        matches: dict[tuple[str, str, str], bool] = {}
        outcomes: list[Outcome | None] = []
        authenticated: dict[Device, int] = {}
        for submission in submissions:
            device = submission.device
            stored_hash = hashes.get(device)
            pair = (*device, submission.token)
            if stored_hash is None:
                outcomes.append(Rejected(UNKNOWN_DEVICE, _unknown(device)))
                continue
            matched = True if submission.broker else matches.get(pair)
            if matched is None:
                matched = matches[pair] = device_token_matches(submission.token, stored_hash)
            if not matched:
                outcomes.append(Rejected(INVALID_DEVICE_TOKEN, _WRONG_TOKEN))
                continue
            outcomes.append(None)
            authenticated[device] = authenticated.get(device, 0) + 1
        if self._admit is None:
            return outcomes
        # Each device's first admitted messages pass; its later ones get the refusal.
        passes: dict[Device, tuple[int, Rejected | None]] = {
            device: self._admit(device, count) for device, count in authenticated.items()
        }
        for i, outcome in enumerate(outcomes):
            if outcome is None:
                device = submissions[i].device
                left, refusal = passes[device]
                if left:
                    passes[device] = (left - 1, refusal)
                else:
                    outcomes[i] = refusal
        return outcomes

    async def _repeated(
        self, conn: asyncpg.Connection, submissions: Sequence[Submission], admitted: list[int]
    ) -> list[int]:
        """The broker's readings among ``admitted`` whose device's seq was claimed already
        (by a transaction that committed, or earlier in this write): a second delivery.

        The claims commit or roll back with the readings: a claim made by a
        transaction still running makes this one wait for its outcome.
        """
        claims = [
            i
            for i in admitted
            if submissions[i].broker
            and (reading := submissions[i].reading) is not None
            and reading.seq is not None
        ]
        if not claims:
            return []
        keys = [(*submissions[i].device, _reading(submissions[i]).seq) for i in claims]
        rows = await conn.fetch(
            Q["claim_broker_seqs"],
            [k[0] for k in keys],
            [k[1] for k in keys],
            [k[2] for k in keys],
        )
        new = {(row["tenant_id"], row["device_id"], row["seq"]) for row in rows}
        repeated = []
        for i, key in zip(claims, keys, strict=True):
            if key in new:
                new.discard(key)  # the first of equal keys in one write is the one stored
            else:
                repeated.append(i)
        return repeated

    async def _insert(
        self, conn: asyncpg.Connection, submissions: Sequence[Submission]
    ) -> list[int | None]:
        """Reserve ids and insert every reading in one statement; each one's id, None if lost."""
        if not submissions:
            return []
        by_tenant: defaultdict[str, list[int]] = defaultdict(list)
        for i, submission in enumerate(submissions):
            by_tenant[submission.tenant_id].append(i)
        tenants = sorted(by_tenant)
        rows = await conn.fetch(
            Q["reserve_event_ids"], tenants, [len(by_tenant[t]) for t in tenants]
        )
        ids: list[int | None] = [None] * len(submissions)
        for row in rows:
            # A NULL base: the tenant was deleted after we authenticated its devices.
            if row["base"] is not None:
                for offset, i in enumerate(by_tenant[row["tenant_id"]], start=1):
                    ids[i] = row["base"] + offset
        stored = [
            _row(submission, event_id)
            for submission, event_id in zip(submissions, ids, strict=True)
            if event_id is not None
        ]
        if stored:
            await conn.execute(Q["insert_telemetry"], stored)
        return ids

    async def _touch(self, conn: asyncpg.Connection, devices: Sequence[Device]) -> list[Device]:
        """Mark devices seen and ONLINE; return those that were not ONLINE before."""
        if not devices:
            return []
        rows = await conn.fetch(
            Q["touch_devices"], [d[0] for d in devices], [d[1] for d in devices]
        )
        return [
            (row["tenant_id"], row["device_id"])
            for row in rows
            if row["previous_status"] != "ONLINE"
        ]


def _settle(
    group: list[tuple[Sequence[Submission], asyncio.Future[list[R]]]],
    commit: asyncio.Future[list[R]],
) -> None:
    """Hand each caller of a group commit its own slice of the outcomes, or the error."""
    error = None if commit.cancelled() else commit.exception()
    offset = 0
    for subs, waiter in group:
        if not waiter.done():
            if commit.cancelled():
                waiter.cancel()
            elif error is not None:
                waiter.set_exception(error)
            else:
                waiter.set_result(commit.result()[offset : offset + len(subs)])
        offset += len(subs)


def _reading(submission: Submission) -> Reading:
    assert submission.reading is not None, "heartbeats are never inserted"
    return submission.reading


def _row(submission: Submission, event_id: int) -> dict[str, object]:
    """One row of insert_telemetry's JSON array."""
    reading = _reading(submission)
    return {
        "t": submission.tenant_id,
        "i": event_id,
        "d": submission.device_id,
        "ts": reading.device_time,
        "m": reading.metrics,
        "s": reading.seq,
    }


_WRONG_TOKEN = "The provision token does not match this device."


def _unknown(device: Device) -> str:
    return f"There is no device {device[1]!r} in tenant {device[0]!r}."
