"""The simulated signals: believable, repeatable, and they make alerts and outages happen."""

from __future__ import annotations

import itertools

from pulse.sim.signals import BATTERY_ALERT_BELOW, TEMP_ALERT_ABOVE, SignalModel

HOUR = 3600


def run(index: int, seed: int, seconds: int = HOUR) -> list[dict[str, float] | None]:
    model = SignalModel.for_device(index, seed)
    return [model.advance(1.0) for _ in range(seconds)]


def quiet_spans(readings: list[dict[str, float] | None]) -> list[int]:
    spans, current = [], 0
    for reading in readings:
        if reading is None:
            current += 1
        elif current:
            spans.append(current)
            current = 0
    return spans


def test_the_same_seed_gives_the_same_signals() -> None:
    assert run(3, seed=42, seconds=300) == run(3, seed=42, seconds=300)
    assert run(3, seed=42, seconds=300) != run(3, seed=43, seconds=300)


def test_temperature_drifts_near_its_set_point_with_occasional_breaches() -> None:
    fleet = {i: run(i, seed=1) for i in range(24)}
    breaching = 0
    for i, readings in fleet.items():
        model = SignalModel.for_device(i, 1)
        temps = [r["temp"] for r in readings if r]
        assert min(temps) > 10 and max(temps) < 45
        # Most of the time within a few degrees of the set point.
        near = sum(abs(t - model.set_point) < 4 for t in temps)
        assert near > 0.75 * len(temps)
        # Noise: consecutive readings differ, by small steps.
        assert sum(a != b for a, b in itertools.pairwise(temps)) > 0.8 * len(temps)
        breaching += any(t > TEMP_ALERT_ABOVE for t in temps)
        assert all(0 <= r["humidity"] <= 100 for r in readings if r)
    assert breaching >= 6  # an hour of a 24-device fleet shows several heat excursions


def test_batteries_drain_and_are_replaced() -> None:
    readings = [r for r in run(3, seed=5, seconds=2 * HOUR) if r]  # index 3 starts nearly flat
    levels = [r["battery"] for r in readings]
    assert levels[0] < 20
    assert any(level < BATTERY_ALERT_BELOW for level in levels)
    jumps = [b for a, b in itertools.pairwise(levels) if b > a]
    assert jumps and all(level == 100.0 for level in jumps)  # only ever up by replacement


def test_flaky_devices_go_quiet_and_come_back() -> None:
    flaky = [i for i in range(24) if SignalModel.for_device(i, 9).flaky]
    assert 2 <= len(flaky) <= 6
    spans = [span for i in flaky for span in quiet_spans(run(i, seed=9))]
    assert spans, "no flaky device went quiet in an hour"
    assert all(20 <= span <= 151 for span in spans)
    assert any(span > 60 for span in spans)  # long enough to go OFFLINE in the demo
    steady = next(i for i in range(24) if i not in flaky)
    assert None not in run(steady, seed=9)
