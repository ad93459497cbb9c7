"""The write path: authenticate, reserve ids, insert, mark devices seen, commit."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import logging
import math
from collections.abc import Callable, Mapping, Sequence, Set
from typing import Any, NoReturn, Protocol, TypeVar

import asyncpg

from pulse.auth.device_tokens import device_token_matches
from pulse.db.database import Database
from pulse.db.errors import DatabaseUnavailable
from pulse.db.queries import load_queries
from pulse.errors import INVALID_DEVICE_TOKEN, RATE_LIMITED, UNKNOWN_DEVICE
from pulse.ingest.gates import KeyedLocks
from pulse.ingest.ids import Claim, EventIds
from pulse.ingest.model import Accepted, Device, Outcome, Rejected, Submission
from pulse.ingest.validation import Reading
from pulse.names import is_valid_name

log = logging.getLogger(__name__)

Q = load_queries(__package__)

S = TypeVar("S", bound="Sliceable")

# Writes of at least this many messages are checked before they queue for
# their tenants' gates (TelemetryWriter._check).
CHECK_AHEAD_FROM = 32

# How far a device's last_seen_at may lag its latest message: a write marks a
# device seen only when it is not ONLINE or was last marked longer ago than this.
# It keeps a fleet's readings from rewriting their devices' rows with every batch.
# A device found fresh (ONLINE and marked within this) when its write was checked is
# left unmarked only if the write gets to marking within this of the check, too: one
# that waited longer (for its tenants' rows, or a slow database) may have been moved
# to STALE by the sweeper meanwhile, and is handed to touch_devices to be judged anew.
SEEN_PRECISION_S = 1.0
# Transactions of one set of tenants in flight at once (_commit_waiting).
IN_FLIGHT = 2
# How long a write may wait for its tenants' transaction to begin (the database stuck
# or far behind) before it is answered as unavailable, with nothing of it written: a
# client that gave up waiting would otherwise send it again while it is still queued,
# and both would be stored. A write whose transaction began has its outcome, whenever.
WAIT_S = 10.0

# Admission control, asked once per write with how many messages of each device
# authenticated: the devices of which it admits fewer (the first ones), with how
# many and the refusal for the others (rate_limited, with the seconds to wait).
Admit = Callable[[Mapping[Device, int]], Mapping[Device, tuple[int, Rejected]]]
# Gives back to admission control what it admitted, per device, for messages then not
# stored: their write was refused unavailable or rolled back (TelemetryWriter._refund).
Refund = Callable[[Mapping[Device, int]], object]


@dataclasses.dataclass(slots=True, eq=False)
class _Queued:
    """A write waiting for its tenants' next group (``TelemetryWriter._write_grouped``):
    ``checked``, its checks if it was checked already (``_check``), None if not;
    ``expiry``, the timer that answers it unavailable if no group took it in time."""

    submissions: Sequence[Submission]
    checked: Checked | None
    future: asyncio.Future[list[Outcome]]
    deadline: float  # the loop's time by which its transaction must have a connection
    expiry: asyncio.TimerHandle | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Checked:
    """The token and rate checks of some submissions: one verdict each (None
    admits), and the devices that were ONLINE and marked seen within the precision
    when checked, which the write need not mark again (``touch_devices``) if it
    marks its devices within the precision of ``judged_at`` (the event loop's time,
    taken before the check was sent)."""

    verdicts: list[Outcome | None]
    fresh: frozenset[Device]
    judged_at: float

    def __getitem__(self, part: slice) -> Checked:
        """The checks of the submissions in ``part``; ``fresh`` is kept whole."""
        return Checked(self.verdicts[part], self.fresh, self.judged_at)


@dataclasses.dataclass(frozen=True, slots=True)
class TenantRows:
    """A tenant's readings stored by one write, in id order: ``readings[k]`` took the
    id ``first_id + k`` (a tenant's ids in one write are consecutive)."""

    first_id: int
    readings: list[Reading]

    @property
    def last_id(self) -> int:
        return self.first_id + len(self.readings) - 1


@dataclasses.dataclass(frozen=True)
class Written:
    """What one transaction wrote, handed to the hooks before it commits."""

    rows: dict[str, TenantRows]  # by tenant
    seen: list[Device]
    came_online: list[Device]
    # The tenants of ``rows`` that had alert rules when the write took its ids (after
    # its readings came): the others have nothing for the rules to look at.
    ruled: frozenset[str]

    def reading(self, tenant_id: str, event_id: int) -> Reading:
        """The reading stored as the tenant's ``event_id`` by this write."""
        rows = self.rows[tenant_id]
        return rows.readings[event_id - rows.first_id]


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
        refund: Refund | None = None,
        rules: TransactionHook | None = None,
        hooks: Sequence[TransactionHook] = (),
        group_commit: bool = True,
        on_remade: Callable[[], object] | None = None,
        seen_precision_s: float = SEEN_PRECISION_S,
        wait_s: float = WAIT_S,
    ) -> None:
        self._db = db
        self._wait_s = wait_s
        # A device ONLINE and seen this recently is not marked seen again (touch_devices).
        self._seen_precision_s = seen_precision_s
        self._admit = admit
        self._refund_admitted = refund
        # The alert rules, run for a write with something for them: readings of a
        # tenant with rules (Written.ruled), or devices that came online. A write with
        # neither may commit with its reservation, in one round trip. ``hooks`` run
        # for every write (and so every write commits apart).
        self._rules = rules
        self._hooks = tuple(hooks)
        self._group_commit = group_commit
        # Writes waiting for the gates of the same tenants, to be committed together.
        self._waiting: dict[frozenset[str], list[_Queued]] = {}
        # Writers of one tenant commit one at a time anyway (the tenant row
        # lock). A group holds its tenants' gates until its rows are in; the next
        # group's insert then runs beside its commit (pulse.ingest.ids). A busy
        # tenant holds two pooled connections at most, not every one, which
        # would stall the other tenants.
        self._tenant_gates = KeyedLocks()
        self.ids = EventIds()  # what this writer foresees, and how often it was right
        self._on_remade = on_remade
        self._committers: set[asyncio.Task[None]] = set()  # _commit_waiting, one per tenants
        # Transactions in flight (a group's, or a write's without group commit), each
        # with its callers: what ``stop`` ends and answers.
        self._in_flight: dict[asyncio.Task[list[Outcome]], _Callers] = {}
        # Those of them whose COMMIT has gone out (None), or has come back (their
        # outcomes, while the devices are marked seen): ``stop`` lets them finish.
        self._committing: dict[asyncio.Task[Any], list[Outcome] | None] = {}
        # The tenants found with alert rules by their latest reservation here: their
        # foreseen writes reserve apart from their COMMIT, for the rules in between.
        self._ruled: set[str] = set()
        # A committer with nothing to start waits for a write to come, or the
        # transaction it has in flight to end (_next_write_or_end).
        self._wakes: dict[frozenset[str], asyncio.Future[None]] = {}
        # Writes waiting for their tokens and rates to be checked (_check).
        self._unchecked: list[tuple[Sequence[Submission], asyncio.Future[Checked]]] = []
        self._being_checked: list[tuple[Sequence[Submission], asyncio.Future[Checked]]] = []
        self._stopped = False  # the server's time for requests is up (stop)
        self._checking: asyncio.Task[None] | None = None

    async def write(self, submissions: Sequence[Submission]) -> list[Outcome]:
        """Write every submission that authenticates and is admitted; one outcome each, in order.

        Readings of any number of devices and tenants share one transaction;
        heartbeats (``reading is None``) only mark their device as seen.
        """
        if not submissions:
            return []
        if self._stopped:
            raise _stopping()
        tenants = frozenset(s.tenant_id for s in submissions if s.reading is not None)
        if not (self._group_commit and tenants):
            return await self._write_alone(tenants, submissions)
        # One budget for the whole wait, checks and queue: ``wait_s`` from now.
        deadline = asyncio.get_running_loop().time() + self._wait_s
        if len(submissions) < CHECK_AHEAD_FROM:
            return await self._write_grouped(tenants, submissions, None, deadline)
        checked = await self._check(submissions, deadline)
        if self._stopped:  # stopped as its checks came back: nothing begins after a stop
            self._refund(submissions, checked.verdicts)
            raise _stopping()
        if not any(checked.verdicts):  # every one admitted: the common case
            return await self._write_grouped(tenants, submissions, checked, deadline)
        admitted = [
            s for s, outcome in zip(submissions, checked.verdicts, strict=True) if outcome is None
        ]
        tenants = frozenset(s.tenant_id for s in admitted if s.reading is not None)
        written = iter(
            await self._write_grouped(tenants, admitted, checked, deadline) if admitted else []
        )
        outcomes = [next(written) if outcome is None else outcome for outcome in checked.verdicts]
        if _limited_broker_seqs(submissions, outcomes):  # rare: a look of its own
            async with self._db.connection() as conn:
                for i in await self._stored_before(conn, submissions, outcomes):
                    outcomes[i] = Accepted(None, duplicate=True)
        return outcomes

    async def _write_alone(
        self, tenants: frozenset[str], submissions: Sequence[Submission]
    ) -> list[Outcome]:
        """A write in a transaction of its own (without group commit, or heartbeats
        only), in a task of its own, which ``stop`` may end."""
        loop = asyncio.get_running_loop()
        task = loop.create_task(self._commit_alone(tenants, submissions))
        answer: asyncio.Future[list[Outcome]] = loop.create_future()
        self._track(task, [(submissions, answer)])
        try:
            return await answer
        except asyncio.CancelledError:
            task.cancel()  # its caller went away: so does the write
            raise

    async def _commit_alone(
        self, tenants: frozenset[str], submissions: Sequence[Submission]
    ) -> list[Outcome]:
        async with self._tenant_gates.hold(tenants):
            return await self._commit(submissions)

    def stop(self, grace_s: float = 0.5) -> None:
        """The server is shutting down and its requests' time is nearly up: end the
        writes still in flight (a write waiting on a lock, a slow commit). Their
        statements are cancelled, so their transactions roll back, and their callers,
        like any write that comes later, get DatabaseUnavailable: a 503, not a cut
        connection, for a write not known to be committed.

        A write whose COMMIT has gone out is not cancelled (a cancel cannot undo a
        COMMIT that has reached the database; its caller would get a 503 for readings
        stored all the same): it has ``grace_s`` to finish and answer. Only if it has
        not by then (a database that stopped answering) is it ended as the others."""
        self._stopped = True
        # Not one that has ended (committed, its callers told in a moment by _settle),
        # nor one whose COMMIT went out.
        ending = [
            task for task in self._in_flight if not task.done() and task not in self._committing
        ]
        for task in (*self._committers, *ending, self._checking):
            if task is not None:
                task.cancel()
        # Answered now, not once their transactions have ended: a statement cancelled on
        # a database that stopped answering (SIGSTOPped, a machine gone) is not done
        # until the server answers the cancel, and its caller would be cut at the
        # timeout, hypercorn's empty 500. Cancelled, a transaction is not known to be
        # committed (_settle says the same when it ends).
        waiters: list[asyncio.Future[Any]] = [
            waiter for task in ending for _, waiter in self._in_flight[task]
        ]
        waiters += [future for _, future in (*self._being_checked, *self._unchecked)]
        for waiter in waiters:
            if not waiter.done():
                waiter.set_exception(_stopping())
        # The writes still queued for a group, answered here: a committer cancelled
        # before its first step never runs the finally that would answer them.
        for queue in self._waiting.values():
            self._not_written(queue)
            queue.clear()
        if self._committing:
            asyncio.get_running_loop().call_later(grace_s, self._give_up)

    def _give_up(self) -> None:
        """``stop``'s grace is over: the writes still committing are ended. One whose
        COMMIT came back (marking its devices seen now) has its callers' outcomes."""
        for task, outcomes in list(self._committing.items()):
            callers = self._in_flight.get(task, [])
            if outcomes is not None:
                _hand_out(callers, outcomes)
            task.cancel()
            for _, waiter in callers:
                if not waiter.done():
                    waiter.set_exception(_stopping())

    def _committing_now(self) -> None:
        """The calling transaction's COMMIT goes out now: ``stop`` lets it finish."""
        task = asyncio.current_task()
        if task is not None:
            self._committing[task] = None

    def _track(self, commit: asyncio.Task[list[Outcome]], callers: _Callers) -> None:
        """``commit``'s outcome to its callers when it ends, or to ``stop``'s 503."""
        for _, waiter in callers:
            # A caller that went away leaves its answer unread: that is not an error.
            waiter.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._in_flight[commit] = callers
        commit.add_done_callback(functools.partial(_settle, callers))
        commit.add_done_callback(self._in_flight.pop)

    async def _check(self, submissions: Sequence[Submission], deadline: float) -> Checked:
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
        future: asyncio.Future[Checked] = loop.create_future()
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        entry = (submissions, future)
        self._unchecked.append(entry)
        if self._checking is None:
            self._checking = loop.create_task(self._check_queued())
        try:
            async with asyncio.timeout_at(deadline):
                return await asyncio.shield(future)
        except BaseException as exc:
            # Checks write nothing: the write is given up whether they ran or not. Not
            # checked yet, it is not checked; being checked, what the checks admit is
            # given back when they come (_check_queued: its answer is not taken).
            self._unchecked = [other for other in self._unchecked if other is not entry]
            if not future.cancel() and future.exception() is None:  # they came meanwhile
                self._refund(submissions, future.result().verdicts)
            if not isinstance(exc, TimeoutError):
                raise  # its caller went away
            raise DatabaseUnavailable(
                f"its tokens could not be checked within {self._wait_s:g} s (the database "
                "is slow or stuck); nothing of it was stored"
            ) from None

    async def _check_queued(self) -> None:
        try:
            while self._unchecked:
                group, self._unchecked = self._unchecked, []
                self._being_checked = group
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
                    self._refund_unclaimed(group, checking)
                    _settle(group, checking)
        finally:
            self._checking = None
            self._being_checked = []

    def _refund_unclaimed(
        self,
        group: list[tuple[Sequence[Submission], asyncio.Future[Checked]]],
        checking: asyncio.Future[Checked],
    ) -> None:
        """Give back what ``checking`` admitted for the writes of ``group`` whose callers
        no longer wait for it (gone past their deadline, or the server stopping): they
        will not be written. A loop over the writes, not the readings, when none is gone."""
        if not checking.done() or checking.cancelled() or checking.exception() is not None:
            return
        offset = 0
        for submissions, waiter in group:
            if waiter.done():
                part = slice(offset, offset + len(submissions))
                self._refund(submissions, checking.result().verdicts[part])
            offset += len(submissions)

    def _refund(
        self, submissions: Sequence[Submission], verdicts: Sequence[Outcome | None] | None = None
    ) -> None:
        """Give back the rate tokens of ``submissions`` that their checks admitted (a
        ``verdicts`` of None; all of them without ``verdicts``), for a write that is not
        stored: refused unavailable before its transaction began, or rolled back. Never
        for one whose COMMIT went out (``_committing``): it may be stored. Only on those
        failures, never on the way of a write that commits."""
        if self._refund_admitted is None:
            return
        if verdicts is not None:
            submissions = [s for s, v in zip(submissions, verdicts, strict=True) if v is None]
        if submissions:
            self._refund_admitted(collections.Counter(s.device for s in submissions))

    async def _write_grouped(
        self,
        tenants: frozenset[str],
        submissions: Sequence[Submission],
        checked: Checked | None,
        deadline: float,
    ) -> list[Outcome]:
        """Group commit: the writes for the same tenants that arrive while a transaction
        runs are all committed by the next one, together.

        A tenant's writers commit one at a time anyway (its counter row), so a
        group costs about what one write costs. One committer per set of tenants
        (``_commit_waiting``) takes the waiting writes a group at a time; a write
        only queues and waits for its answer, given once the group's transaction
        has committed. Writes whose tenants differ but overlap are not merged;
        the gates still order their committers. ``checked``: the write's checks
        (``_check``); None: not checked yet. A write
        still queued at ``deadline`` (the loop's time) is refused unwritten
        (``_expire``), and so is its group if no connection comes by then.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Outcome]] = loop.create_future()
        # A caller that went away leaves its future unread: that is not an error.
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        queued = _Queued(submissions, checked, future, deadline)
        queued.expiry = loop.call_at(deadline, self._expire, tenants, queued)
        waiting = self._waiting.get(tenants)
        if waiting is not None:  # a committer is at work: its next group takes this write
            waiting.append(queued)
            if (wake := self._wakes.get(tenants)) is not None and not wake.done():
                wake.set_result(None)
        else:
            self._waiting[tenants] = [queued]
            committer = loop.create_task(self._commit_waiting(tenants))
            self._committers.add(committer)
            committer.add_done_callback(self._committers.discard)
        return await future

    def _expire(self, tenants: frozenset[str], queued: _Queued) -> None:
        """``queued`` waited ``wait_s`` and no group took it: answered unavailable."""
        waiting = self._waiting.get(tenants, [])
        for i, other in enumerate(waiting):
            if other is queued:
                del waiting[i]
                if queued.checked is not None:  # checked ahead: its admitted are given back
                    self._refund(queued.submissions)
                if not queued.future.done():
                    queued.future.set_exception(
                        DatabaseUnavailable(
                            f"no write of its tenants could begin for {self._wait_s:g} s "
                            "(the database is slow or stuck); nothing of it was stored"
                        )
                    )
                return

    async def _commit_waiting(self, tenants: frozenset[str]) -> None:
        """Commit the writes waiting for ``tenants``, a group per transaction, until
        none is left; a write that arrives meanwhile joins the next group.

        Two transactions are in flight at most: the next group starts once the one
        ahead has inserted its rows (``inserted``), so its insert runs beside the
        other's commit (``pulse.ingest.ids``), and the one before that has ended.
        """
        in_flight: collections.deque[asyncio.Task[list[Outcome]]] = collections.deque()
        try:
            while True:
                while in_flight and in_flight[0].done():
                    in_flight.popleft()
                if not self._waiting[tenants]:
                    if not in_flight:
                        break
                    await self._next_write_or_end(tenants, in_flight[0])
                    continue
                # The gates are taken again for each group: a write whose tenants
                # overlap these, queued at a gate meanwhile, goes first.
                async with self._tenant_gates.hold(tenants):
                    group, self._waiting[tenants] = self._waiting[tenants], []
                    if not group:  # refused (_expire) while the gates were held elsewhere
                        continue
                    everything: list[Submission] = []
                    prechecked: list[bool] = []
                    fresh: set[Device] = set()
                    judged_at = math.inf  # the oldest check's: their fresh are judged as one
                    for queued in group:
                        if queued.expiry is not None:
                            queued.expiry.cancel()
                        everything += queued.submissions
                        prechecked += [queued.checked is not None] * len(queued.submissions)
                        if queued.checked is not None:
                            fresh.update(queued.checked.fresh)
                            judged_at = min(judged_at, queued.checked.judged_at)
                    inserted = asyncio.Event()
                    begin_by = min(queued.deadline for queued in group)
                    commit = asyncio.get_running_loop().create_task(
                        self._commit(
                            everything,
                            prechecked,
                            fresh,
                            judged_at=judged_at,
                            inserted=inserted,
                            begin_by=begin_by,
                        )
                    )
                    self._track(commit, [(queued.submissions, queued.future) for queued in group])
                    in_flight.append(commit)
                    await inserted.wait()
                while len(in_flight) >= IN_FLIGHT:
                    with contextlib.suppress(Exception):
                        # Shielded: a stop cancelling this committer is not passed on
                        # to a transaction whose COMMIT went out (``stop``).
                        await asyncio.shield(in_flight[0])
                    in_flight.popleft()
        finally:
            for task in in_flight:
                if task not in self._committing:  # stop lets a commit that went out finish
                    task.cancel()
            # Stopped (the server is stopping): what still waits is not written.
            self._not_written(self._waiting.pop(tenants, []))

    def _not_written(self, queue: list[_Queued]) -> None:
        """The server is stopping: the writes of ``queue`` are answered 503, unwritten,
        and what their checks admitted is given back."""
        for queued in queue:
            if queued.expiry is not None:
                queued.expiry.cancel()
            if queued.checked is not None:
                self._refund(queued.submissions)
            if not queued.future.done():
                queued.future.set_exception(_stopping())

    async def _next_write_or_end(
        self, tenants: frozenset[str], commit: asyncio.Future[Any]
    ) -> None:
        """Wait until a write for ``tenants`` comes (``_write_grouped``), or ``commit`` ends."""
        wake: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def ended(_: object) -> None:
            if not wake.done():
                wake.set_result(None)

        self._wakes[tenants] = wake
        commit.add_done_callback(ended)
        try:
            await wake
        finally:
            del self._wakes[tenants]
            commit.remove_done_callback(ended)

    async def _commit(
        self,
        submissions: Sequence[Submission],
        prechecked: Sequence[bool] = (),
        fresh: Set[Device] = frozenset(),
        *,
        judged_at: float = math.inf,
        inserted: asyncio.Event | None = None,
        begin_by: float | None = None,
    ) -> list[Outcome]:
        """One transaction. ``prechecked[i]``: submission i passed its checks already,
        which found the devices ``fresh`` fresh at ``judged_at`` (the loop's time).
        ``begin_by`` (the loop's time): the
        transaction is given up unbegun, nothing written, if no pooled connection
        comes by then (every one held by statements a stuck database does not end).

        With ``inserted`` (group commit), the transaction may foresee its ids, and
        sets ``inserted`` once its rows are in: the next group may then begin. A
        foresight that proves wrong costs a second transaction that reserves first;
        the checks made in the first are not made twice.
        """
        verdicts: list[Outcome | None] = [None] * len(submissions)
        unchecked = [i for i, was in enumerate(prechecked or [False] * len(submissions)) if not was]
        foresee = inserted is not None
        task = asyncio.current_task()
        assert task is not None
        try:
            while True:
                claims: list[Claim] = []
                late: list[Device] = []
                try:
                    wait_s = (
                        None
                        if begin_by is None
                        else max(0.01, begin_by - asyncio.get_running_loop().time())
                    )
                    async with self._db.transaction_ending_itself(acquire_timeout=wait_s) as conn:
                        begin_by = None  # begun: a second attempt has its outcome, whenever
                        if unchecked:
                            checked = await self._authenticate(
                                conn, [submissions[i] for i in unchecked]
                            )
                            for i, outcome in zip(unchecked, checked.verdicts, strict=True):
                                verdicts[i] = outcome
                            fresh = fresh | checked.fresh
                            judged_at = min(judged_at, checked.judged_at)
                            unchecked = []  # a second attempt keeps them (and the rates)
                        outcomes = await self._write_in(
                            conn,
                            submissions,
                            verdicts,
                            (fresh, judged_at),
                            claims,
                            late,
                            foresee,
                            inserted,
                        )
                        self._committing_now()
                        if conn.is_in_transaction():  # else committed with its reservation
                            await conn.execute("COMMIT")
                        # Committed: its answer is known, even if giving the connection
                        # back (below, or cancelled by stop's _give_up) fails.
                        self._committing[task] = outcomes
                except _Unforeseen as exc:
                    self._committing.pop(task, None)
                    for claim in claims:
                        self.ids.proven_wrong(claim, by_another=exc.by_another)
                    if self._stopped:
                        # Rolled back (the write ahead, ended by the stop, did not
                        # commit, so its ids were not ours), and nothing begins after
                        # a stop: not made again.
                        self._refund_rolled_back(submissions, verdicts, prechecked, unchecked)
                        raise _stopping() from None
                    if self._on_remade is not None:
                        self._on_remade()
                    foresee = False
                    continue
                except BaseException as exc:
                    done = self._committing.get(task, _NOT_COMMITTING)
                    if not (isinstance(done, list) and isinstance(exc, Exception)):
                        # A COMMIT that went out (given up at a stop, or lost with its
                        # connection) may have stored the rows: their rates stay spent.
                        if done is _NOT_COMMITTING:
                            self._refund_rolled_back(submissions, verdicts, prechecked, unchecked)
                        for claim in claims:
                            self.ids.end(claim, committed=False)
                        raise
                    # Committed; only giving its connection back failed (asyncpg's
                    # reset raised): the rows are stored, and the answer says so.
                    log.warning("a write committed, then its connection failed (%s)", exc)
                    outcomes = done
                for claim in claims:
                    self.ids.end(claim, committed=True)
                if late:
                    await self._mark_seen_late(late)
                return outcomes
        finally:
            self._committing.pop(task, None)
            if inserted is not None:
                inserted.set()

    def _refund_rolled_back(
        self,
        submissions: Sequence[Submission],
        verdicts: Sequence[Outcome | None],
        prechecked: Sequence[bool],
        unchecked: Sequence[int],
    ) -> None:
        """``_commit``'s transaction rolled back, or never began: give back what its
        submissions' checks admitted. Those made in the transaction count once made
        (``unchecked`` empty); a write remade after a wrong foresight keeps them, and
        is given back once, when it fails for good. Those made ahead (``prechecked``)
        admitted every submission they let in: a write queues its admitted ones only."""
        if not unchecked:
            self._refund(submissions, verdicts)
        elif any(prechecked):
            self._refund([s for s, was in zip(submissions, prechecked, strict=True) if was])

    async def _write_in(
        self,
        conn: asyncpg.Connection,
        submissions: Sequence[Submission],
        verdicts: Sequence[Outcome | None],
        fresh: tuple[Set[Device], float],
        claims: list[Claim],
        late: list[Device],
        foresee: bool = False,
        inserted: asyncio.Event | None = None,
    ) -> list[Outcome]:
        """The transaction's work, the checks' ``verdicts`` given (None admits) and the
        devices they found ``fresh`` (with when); the ids it takes are added to
        ``claims``, and to ``late`` the devices to mark seen once it has committed."""
        outcomes = list(verdicts)
        admitted = [i for i, outcome in enumerate(outcomes) if outcome is None]
        for i in await self._repeated(conn, submissions, admitted):
            outcomes[i] = Accepted(None, duplicate=True)
        if any(outcomes):  # some were refused: any for the rate, of a stored reading?
            for i in await self._stored_before(conn, submissions, outcomes):
                outcomes[i] = Accepted(None, duplicate=True)
        # Each tenant's readings, in the order they came: the order of their ids.
        by_tenant: dict[str, list[int]] = {}
        for i in admitted:
            submission = submissions[i]
            if outcomes[i] is None and submission.reading is not None:
                by_tenant.setdefault(submission.tenant_id, []).append(i)
        # The devices to mark seen, known before the ids are taken: a write with none
        # (and no tenant with rules) may commit with its reservation.
        seen = _seen(submissions, admitted, outcomes)
        unfresh = self._to_mark(seen, *fresh)
        rows, ruled = await self._insert(
            conn,
            submissions,
            by_tenant,
            claims,
            foresee,
            inserted,
            may_commit=not (unfresh or self._hooks),
        )
        for tenant_id, indexes in by_tenant.items():
            taken = rows.get(tenant_id)
            if taken is None:  # the tenant was deleted after its devices authenticated
                for i in indexes:
                    outcomes[i] = Rejected(UNKNOWN_DEVICE, _unknown(submissions[i].device))
            else:
                for event_id, i in enumerate(indexes, start=taken.first_id):
                    outcomes[i] = Accepted(event_id)
        if len(rows) < len(by_tenant):  # a tenant was deleted: its readings were refused
            seen = _seen(submissions, admitted, outcomes)
        # Judged again now that the write has its tenants' rows, after however long a wait.
        unfresh = self._to_mark(seen, *fresh)
        if not conn.is_in_transaction():  # committed with its reservation (_take_and_commit)
            late += unfresh
            return [Accepted(None) if outcome is None else outcome for outcome in outcomes]
        came_online = await self._touch(conn, unfresh)
        written = Written(rows=rows, seen=seen, came_online=came_online, ruled=ruled)
        # The seam for alert rules: they see the rows before anyone else can.
        if self._rules is not None and (ruled or came_online):
            await self._rules(conn, written)
        for hook in self._hooks:
            await hook(conn, written)
        # What is still undecided here is an admitted heartbeat.
        return [Accepted(None) if outcome is None else outcome for outcome in outcomes]

    def _to_mark(
        self, seen: Sequence[Device], fresh: Set[Device], judged_at: float
    ) -> list[Device]:
        """The devices of ``seen`` to hand to touch_devices: those not found fresh, or all
        of them once their check is older than the precision (the sweeper may have moved
        them since; touch_devices leaves alone those still ONLINE and seen recently)."""
        if asyncio.get_running_loop().time() - judged_at > self._seen_precision_s:
            return list(seen)
        return [device for device in seen if device not in fresh]

    async def _mark_seen_late(self, devices: list[Device]) -> None:
        """Mark seen, in a transaction of its own, the devices of a write that committed
        with its reservation (``_take_and_commit``: they were fresh when checked) but
        waited for it past the precision: the sweeper may have moved them to STALE
        meanwhile. Rare (a tenant's row held long, a slow database), and done before the
        write is answered. The readings are stored whatever happens here, and the write's
        answer says so: a failure is logged; the device's next message marks it."""
        try:
            async with self._db.transaction_ending_itself() as conn:
                came_online = await self._touch(conn, devices)
                if came_online and self._rules is not None:
                    await self._rules(
                        conn,
                        Written(rows={}, seen=devices, came_online=came_online, ruled=frozenset()),
                    )
        except Exception:
            log.warning(
                "could not mark %d devices seen after their write", len(devices), exc_info=True
            )

    async def check_token(
        self, tenant_id: str, device_id: str, token: str | None
    ) -> Rejected | None:
        """Whether ``token`` is the device's, asked apart from any write (before a
        request's body is read, pulse.ingest.buffer): None when it is, else the refusal
        the write would give. Nothing is counted against the device's rate."""
        if not (is_valid_name(tenant_id) and is_valid_name(device_id)):
            return Rejected(UNKNOWN_DEVICE, _unknown((tenant_id, device_id)))
        asked = [{"t": tenant_id, "o": 0, "d": [device_id]}]
        rows = await self._db.fetch(Q["device_token_hashes"], asked, self._seen_precision_s)
        if not rows:
            return Rejected(UNKNOWN_DEVICE, _unknown((tenant_id, device_id)))
        if token is None or not device_token_matches(token, rows[0]["token_hash"]):
            return Rejected(INVALID_DEVICE_TOKEN, _WRONG_TOKEN)
        return None

    async def _authenticate(
        self, conn: asyncpg.Connection, submissions: Sequence[Submission]
    ) -> Checked:
        """Reject unknown devices, wrong tokens and messages over the rate; None admits.

        Checked per device and token, not per message: a batch repeats each
        device's token, and admission takes all of a device's messages at once.
        The same read tells which devices are fresh.
        """
        keys = [(s.tenant_id, s.device_id, s.token, s.broker) for s in submissions]
        distinct = dict.fromkeys(keys)
        by_tenant: dict[str, list[str]] = {}
        for device in dict.fromkeys((t, d) for t, d, _, _ in distinct):
            by_tenant.setdefault(device[0], []).append(device[1])
        devices: list[Device] = []  # numbered as the query numbers them
        asked = []
        for tenant_id, device_ids in by_tenant.items():
            asked.append({"t": tenant_id, "o": len(devices), "d": device_ids})
            devices += [(tenant_id, device_id) for device_id in device_ids]
        judged_at = asyncio.get_running_loop().time()
        rows = await conn.fetch(Q["device_token_hashes"], asked, self._seen_precision_s)
        hashes = {devices[i]: token_hash for i, token_hash, _ in rows}
        fresh = frozenset(devices[i] for i, _, is_fresh in rows if is_fresh)
        verdicts: dict[tuple[str, str, str, bool], Outcome | None] = {}
        for tenant_id, device_id, token, broker in distinct:
            stored_hash = hashes.get((tenant_id, device_id))
            if stored_hash is None:
                verdict: Outcome | None = Rejected(UNKNOWN_DEVICE, _unknown((tenant_id, device_id)))
            elif broker or device_token_matches(token, stored_hash):
                verdict = None
            else:
                verdict = Rejected(INVALID_DEVICE_TOKEN, _WRONG_TOKEN)
            verdicts[(tenant_id, device_id, token, broker)] = verdict
        outcomes = [verdicts[key] for key in keys]
        if self._admit is None:
            return Checked(outcomes, fresh, judged_at)
        authenticated = collections.Counter(
            (tenant_id, device_id)
            for (tenant_id, device_id, _, _), outcome in zip(keys, outcomes, strict=True)
            if outcome is None
        )
        # Each device's first admitted messages pass; its later ones get the refusal.
        passes = dict(self._admit(authenticated))
        if not passes:  # every authenticated message is admitted: the common case
            return Checked(outcomes, fresh, judged_at)
        for i, outcome in enumerate(outcomes):
            if outcome is None and (device := submissions[i].device) in passes:
                left, refusal = passes[device]
                if left:
                    passes[device] = (left - 1, refusal)
                else:
                    outcomes[i] = refusal
        return Checked(outcomes, fresh, judged_at)

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
        keys = _seq_keys(submissions, claims)
        rows = await conn.fetch(Q["claim_broker_seqs"], *_columns(keys))
        new = {(row["tenant_id"], row["device_id"], row["seq"]) for row in rows}
        repeated = []
        for i, key in zip(claims, keys, strict=True):
            if key in new:
                new.discard(key)  # the first of equal keys in one write is the one stored
            else:
                repeated.append(i)
        return repeated

    async def _stored_before(
        self,
        conn: asyncpg.Connection,
        submissions: Sequence[Submission],
        outcomes: Sequence[Outcome | None],
    ) -> list[int]:
        """The broker's readings refused for the rate whose device's seq was claimed
        already: a second delivery of a stored reading is a duplicate, not a reading
        over the limit (admission counts before the claims are looked at).

        The seqs are claimed for a moment, then let go: a claim made by a write still
        in flight (the broker delivered again before the first delivery committed)
        makes this one wait for its outcome, as ``_repeated`` does.
        """
        limited = _limited_broker_seqs(submissions, outcomes)
        if not limited:
            return []
        keys = _seq_keys(submissions, limited)
        # Undone at once: a savepoint inside the write's transaction, else one of its own.
        inside = conn.is_in_transaction()
        await conn.execute("SAVEPOINT probe" if inside else "BEGIN")
        try:
            rows = await conn.fetch(Q["claim_broker_seqs"], *_columns(keys))
        finally:
            await conn.execute("ROLLBACK TO SAVEPOINT probe" if inside else "ROLLBACK")
        unclaimed = {(row["tenant_id"], row["device_id"], row["seq"]) for row in rows}
        return [i for i, key in zip(limited, keys, strict=True) if key not in unclaimed]

    async def _insert(
        self,
        conn: asyncpg.Connection,
        submissions: Sequence[Submission],
        by_tenant: dict[str, list[int]],
        claims: list[Claim],
        foresee: bool,
        inserted: asyncio.Event | None,
        *,
        may_commit: bool = False,
    ) -> tuple[dict[str, TenantRows], frozenset[str]]:
        """Take ids for every reading of ``by_tenant`` (each tenant's submissions, in
        order) and insert them in one statement; the rows stored, by tenant (a tenant
        deleted since its devices authenticated has none), and the tenants that have
        alert rules, as the reservation found them.

        The ids are foreseen when this process knows them (``pulse.ingest.ids``): the
        rows go in first, and the reservation after, once the writes ahead hold their
        rows; if it does not give the ids foreseen, ``_Unforeseen`` rolls back.
        Otherwise the ids are reserved first, as the foresight's fallback. A foreseen
        write that ``may_commit`` (no device to mark seen after the reservation) and
        whose tenants had no alert rules when last seen here commits with its
        reservation, in one round trip (``pulse_take_foreseen_ids``).
        """
        if inserted is not None and not by_tenant:
            inserted.set()
        if not by_tenant:
            return {}, frozenset()
        tenants = sorted(by_tenant)
        counts = {tenant: len(by_tenant[tenant]) for tenant in tenants}
        ended = asyncio.get_running_loop().create_future()
        claim = self.ids.foresee(counts, ended) if foresee else None
        if claim is None:
            reserved = await conn.fetch(Q["reserve_event_ids"], tenants, list(counts.values()))
            # A NULL base: the tenant was deleted after we authenticated its devices.
            bases = {row["tenant_id"]: row["base"] for row in reserved if row["base"] is not None}
            ruled = self._saw_rules(reserved)
            if inserted is not None:
                claims.append(self.ids.reserved({t: counts[t] for t in bases}, bases, ended))
        else:
            claims.append(claim)
            bases = claim.bases
        rows: dict[str, TenantRows] = {}
        stored: list[dict[str, object]] = []
        for tenant_id, base in bases.items():
            first_id = base + 1
            written = [submissions[i] for i in by_tenant[tenant_id]]
            readings = [_reading(submission) for submission in written]
            rows[tenant_id] = TenantRows(first_id, readings)
            stored.append(
                {
                    "t": tenant_id,
                    "i": first_id,
                    "r": [
                        [submission.device_id, r.device_time, r.metrics, r.seq]
                        for submission, r in zip(written, readings, strict=True)
                    ],
                }
            )
        if stored:
            await conn.execute(Q["insert_telemetry"], stored)
        if inserted is not None:
            inserted.set()
        if claim is not None:
            for ahead in claim.ahead:
                if not await asyncio.shield(ahead.holds):  # a write ahead will not commit
                    raise _Unforeseen(by_another=False)
            # Waits in PostgreSQL for the writes ahead, which hold the tenants' rows.
            if may_commit and self._ruled.isdisjoint(tenants) and all(map(is_valid_name, tenants)):
                await self._take_and_commit(conn, claim, tenants, counts)
                return rows, frozenset()
            reserved = await conn.fetch(Q["reserve_event_ids"], tenants, list(counts.values()))
            if any(row["base"] != claim.bases[row["tenant_id"]] for row in reserved):
                await self._unforeseen(claim)
            self.ids.hold(claim)
            ruled = self._saw_rules(reserved)
        return rows, ruled

    async def _take_and_commit(
        self, conn: asyncpg.Connection, claim: Claim, tenants: list[str], counts: dict[str, int]
    ) -> None:
        """Reserve the foreseen ids and COMMIT, in one string of two statements (one
        round trip: the simple query protocol, so the values are written into it; the
        tenant ids are plain names, checked). The reservation raises, and the COMMIT
        is skipped, when the ids were not free or a tenant has rules."""
        names = ",".join(f"'{tenant}'" for tenant in tenants)
        numbers = ",".join(str(counts[tenant]) for tenant in tenants)
        bases = ",".join(str(claim.bases[tenant]) for tenant in tenants)
        self._committing_now()
        try:
            await conn.execute(
                f"SELECT pulse_take_foreseen_ids(ARRAY[{names}]::text[], "
                f"ARRAY[{numbers}]::integer[], ARRAY[{bases}]::bigint[]); COMMIT"
            )
        except asyncpg.PostgresError as exc:
            if exc.sqlstate == _NOT_FORESEEN:
                await self._unforeseen(claim)
            if exc.sqlstate == _RULED:
                # A rule created since this process saw the tenant: made again with it.
                self._ruled.update(tenants)
                raise _Unforeseen(by_another=False) from exc
            raise
        self.ids.hold(claim)

    async def _unforeseen(self, claim: Claim) -> NoReturn:
        """Raise ``_Unforeseen`` for a reservation that did not give the ids foreseen: a
        write ahead rolled back after its reservation, or another process took some."""
        failed = [not await asyncio.shield(ahead.ended) for ahead in claim.ahead]
        raise _Unforeseen(by_another=not any(failed))

    def _saw_rules(self, reserved: list[asyncpg.Record]) -> frozenset[str]:
        """The tenants a reservation found with alert rules; remembered for the next."""
        ruled = set()
        for row in reserved:
            if row["ruled"]:
                ruled.add(row["tenant_id"])
                self._ruled.add(row["tenant_id"])
            else:
                self._ruled.discard(row["tenant_id"])
        return frozenset(ruled)

    async def _touch(self, conn: asyncpg.Connection, devices: Sequence[Device]) -> list[Device]:
        """Mark devices seen and ONLINE; return those that were not ONLINE before."""
        if not devices:
            return []
        rows = await conn.fetch(
            Q["touch_devices"],
            [d[0] for d in devices],
            [d[1] for d in devices],
            self._seen_precision_s,
        )
        return [
            (row["tenant_id"], row["device_id"])
            for row in rows
            if row["previous_status"] != "ONLINE"
        ]


class Sliceable(Protocol):
    def __getitem__(self: S, part: slice, /) -> S: ...


# A transaction's callers: each one's submissions and its answer.
_Callers = list[tuple[Sequence[Submission], "asyncio.Future[list[Outcome]]"]]


def _settle(
    group: list[tuple[Sequence[Submission], asyncio.Future[S]]],
    commit: asyncio.Future[S],
) -> None:
    """Hand each caller of a group commit its own slice of the outcomes, or the error
    (a commit cancelled: the server is stopping, and it is not known to be committed)."""
    error = _stopping() if commit.cancelled() else commit.exception()
    if error is None:
        _hand_out(group, commit.result())
    for _, waiter in group:
        if not waiter.done():
            waiter.set_exception(error or _stopping())


def _hand_out(group: list[tuple[Sequence[Submission], asyncio.Future[S]]], outcomes: S) -> None:
    """Each caller of a group its own slice of the ``outcomes``."""
    offset = 0
    for subs, waiter in group:
        if not waiter.done():
            waiter.set_result(outcomes[offset : offset + len(subs)])
        offset += len(subs)


def _stopping() -> DatabaseUnavailable:
    # "Not known": a cancel cannot undo a COMMIT that has reached the database already.
    return DatabaseUnavailable(
        "the server is shutting down; the write is not known to be committed"
    )


# What ``_committing`` holds for no transaction (its values are None or outcomes).
_NOT_COMMITTING: Any = object()


class _Unforeseen(Exception):
    """The ids a write foresaw were not the ones it reserved: roll back, and again."""

    def __init__(self, *, by_another: bool) -> None:
        super().__init__()
        self.by_another = by_another  # else a write ahead failed


def _seen(
    submissions: Sequence[Submission], admitted: list[int], outcomes: Sequence[Outcome | None]
) -> list[Device]:
    """The devices of the admitted submissions not refused since, each once, in order."""
    return list(
        dict.fromkeys(
            (submissions[i].tenant_id, submissions[i].device_id)
            for i in admitted
            if not isinstance(outcomes[i], Rejected)
        )
    )


def _reading(submission: Submission) -> Reading:
    assert submission.reading is not None, "heartbeats are never inserted"
    return submission.reading


_WRONG_TOKEN = "The provision token does not match this device."
# pulse_take_foreseen_ids's refusals (migrations/0014_foreseen_ids.sql).
_NOT_FORESEEN = "PU001"
_RULED = "PU002"


def _unknown(device: Device) -> str:
    return f"There is no device {device[1]!r} in tenant {device[0]!r}."


def _limited_broker_seqs(
    submissions: Sequence[Submission], outcomes: Sequence[Outcome | None]
) -> list[int]:
    """The broker's readings with a seq that were refused for the rate."""
    return [
        i
        for i, outcome in enumerate(outcomes)
        if isinstance(outcome, Rejected)
        and outcome.reason is RATE_LIMITED
        and submissions[i].broker
        and (reading := submissions[i].reading) is not None
        and reading.seq is not None
    ]


def _seq_keys(submissions: Sequence[Submission], indexes: list[int]) -> list[tuple[str, str, int]]:
    """The (tenant, device, seq) of broker readings that carry a seq."""
    keys = []
    for i in indexes:
        seq = _reading(submissions[i]).seq
        assert seq is not None
        keys.append((*submissions[i].device, seq))
    return keys


def _columns(keys: Sequence[tuple[str, str, int]]) -> tuple[list[str], list[str], list[int]]:
    """(tenant, device, seq) keys as the three arrays the seq queries take."""
    return [k[0] for k in keys], [k[1] for k in keys], [k[2] for k in keys]
