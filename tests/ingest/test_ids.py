"""EventIds: which ids a write may foresee, after which writes it must reserve them."""

from __future__ import annotations

import asyncio

from pulse.ingest.ids import DOUBT_SECONDS, EventIds


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def ended() -> asyncio.Future[bool]:
    return asyncio.get_running_loop().create_future()


async def test_nothing_is_foreseen_before_a_reservation() -> None:
    ids = EventIds()
    assert ids.foresee({"t1": 3}, ended()) is None
    assert ids.foreseen == 0


async def test_ids_follow_the_reservation_and_the_writes_in_flight() -> None:
    ids = EventIds()
    first = ids.reserved({"t1": 3}, {"t1": 10}, ended())  # took 11..13
    second = ids.foresee({"t1": 2}, ended())
    assert second is not None and second.bases == {"t1": 13}  # 14..15
    assert second.ahead == [first]
    third = ids.foresee({"t1": 1, "t2": 5}, ended())
    assert third is None, "t2's ids are not known yet"
    ids.reserved({"t2": 5}, {"t2": 0}, ended())
    third = ids.foresee({"t1": 1, "t2": 5}, ended())
    assert third is not None and third.bases == {"t1": 15, "t2": 5}
    assert third.ahead[0] is second and third.ahead[1].bases == {"t2": 0}
    assert ids.foreseen == 2


async def test_a_write_behind_may_reserve_once_the_one_ahead_holds_its_rows() -> None:
    ids = EventIds()
    first = ids.reserved({"t1": 1}, {"t1": 0}, ended())
    assert first.holds.result() is True  # it reserved: it holds the tenant's row
    second = ids.foresee({"t1": 1}, ended())
    third = ids.foresee({"t1": 1}, ended())
    assert second is not None and third is not None and third.ahead == [second]
    assert not second.holds.done()  # foreseen: not until its reservation says so
    ids.hold(second)
    assert second.holds.result() is True
    # One that fails before it holds tells the writes behind it that it never will.
    fourth = ids.foresee({"t1": 1}, ended())
    assert fourth is not None
    ids.end(fourth, committed=False)
    assert fourth.holds.result() is False and fourth.ended.result() is False
    # An ended write keeps no hold on those before it: the chain ends with the writes
    # in flight, not with the process.
    assert fourth.ahead == []


async def test_a_write_that_ends_is_no_longer_waited_for() -> None:
    ids = EventIds()
    first = ids.reserved({"t1": 1}, {"t1": 0}, ended())
    ids.end(first, committed=True)
    assert first.ended.result() is True
    second = ids.foresee({"t1": 1}, ended())
    assert second is not None and second.bases == {"t1": 1} and second.ahead == []


async def test_a_write_that_did_not_commit_breaks_the_chain() -> None:
    ids = EventIds()
    first = ids.reserved({"t1": 1}, {"t1": 0}, ended())
    second = ids.foresee({"t1": 1}, ended())
    assert second is not None
    ids.end(first, committed=False)
    assert first.ended.result() is False  # the second write learns it, and is made again
    assert ids.foresee({"t1": 1}, ended()) is None  # the next reserves first
    assert len(ids) == 0


async def test_ids_taken_by_another_writer_stop_the_foresight_for_a_while() -> None:
    clock = Clock()
    ids = EventIds(clock)
    ids.end(ids.reserved({"t1": 1, "t2": 1}, {"t1": 0, "t2": 0}, ended()), committed=True)
    claim = ids.foresee({"t1": 1}, ended())
    assert claim is not None
    ids.proven_wrong(claim, by_another=True)
    assert ids.wrong == 1
    assert ids.foresee({"t2": 1}, ended()) is not None  # another tenant is not in doubt
    ids.end(ids.reserved({"t1": 1}, {"t1": 7}, ended()), committed=True)
    assert ids.foresee({"t1": 1}, ended()) is None
    clock.now += DOUBT_SECONDS + 0.01
    again = ids.foresee({"t1": 1}, ended())
    assert again is not None and again.bases == {"t1": 8}


async def test_a_write_ahead_that_failed_casts_no_doubt() -> None:
    ids = EventIds()
    ids.end(ids.reserved({"t1": 1}, {"t1": 0}, ended()), committed=True)
    claim = ids.foresee({"t1": 1}, ended())
    assert claim is not None
    ids.proven_wrong(claim, by_another=False)
    ids.end(ids.reserved({"t1": 1}, {"t1": 0}, ended()), committed=True)
    assert ids.foresee({"t1": 1}, ended()) is not None
