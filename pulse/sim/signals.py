"""Believable readings for one simulated device. Pure: a seeded model, no clock, no I/O.

- temperature drifts around the device's set point (a mean-reverting random
  walk plus noise and a slow daily-like swing), with occasional heat
  excursions that cross the demo's alert threshold and then cool down;
- humidity moves against temperature, with its own noise;
- the battery drains a little every second and is replaced when flat;
- some devices ("flaky" ones) go quiet now and then and come back, so that
  STALE, OFFLINE and no-heartbeat alerts appear.
"""

from __future__ import annotations

import dataclasses
import math
import random

TEMP_ALERT_ABOVE = 32.0
BATTERY_ALERT_BELOW = 15.0


@dataclasses.dataclass
class SignalModel:
    rng: random.Random
    set_point: float  # degrees C
    humidity_base: float  # percent
    battery: float  # percent
    drain_per_s: float
    flaky: bool
    temp: float = dataclasses.field(init=False)
    excursion: float = 0.0  # degrees added by a heat excursion in progress
    excursion_peak: float = 0.0
    rising: bool = False
    quiet_for_s: float = 0.0  # > 0: the device sends nothing for this much longer
    elapsed_s: float = 0.0

    def __post_init__(self) -> None:
        self.temp = self.set_point + self.rng.gauss(0, 0.5)

    @classmethod
    def for_device(cls, index: int, seed: int | None) -> SignalModel:
        rng = random.Random(None if seed is None else seed * 100_003 + index)
        # A few devices start nearly flat, so that a low-battery alert shows within a minute.
        nearly_flat = index % 11 == 3
        return cls(
            rng=rng,
            set_point=rng.uniform(18.0, 26.0),
            humidity_base=rng.uniform(35.0, 60.0),
            battery=rng.uniform(15.3, 16.5) if nearly_flat else rng.uniform(45.0, 100.0),
            drain_per_s=rng.uniform(0.02, 0.03) if nearly_flat else rng.uniform(0.003, 0.01),
            flaky=index % 6 == 5,
        )

    def advance(self, dt_s: float) -> dict[str, float] | None:
        """Move the model on by ``dt_s`` seconds; the reading to send, or None when quiet."""
        self.elapsed_s += dt_s
        if self.quiet_for_s > 0:
            self.quiet_for_s -= dt_s
            return None
        if self.flaky and self.rng.random() < dt_s / 240:
            # Quiet spans cross both the STALE and the OFFLINE thresholds of the demo.
            self.quiet_for_s = self.rng.uniform(20.0, 150.0)
            return None
        return self._reading(dt_s)

    def _reading(self, dt_s: float) -> dict[str, float]:
        rng = self.rng
        swing = 1.5 * math.sin(2 * math.pi * self.elapsed_s / 900.0 + self.set_point)
        # Mean reversion towards the set point, plus a random step.
        self.temp += 0.05 * dt_s * (self.set_point + swing - self.temp) + rng.gauss(0, 0.08)
        self._step_excursion(dt_s)
        temp = self.temp + self.excursion + rng.gauss(0, 0.05)
        humidity = self.humidity_base - 1.2 * (temp - self.set_point) + rng.gauss(0, 0.6)
        self.battery -= self.drain_per_s * dt_s
        if self.battery < 5.0:
            self.battery = 100.0  # replaced
        return {
            "temp": round(temp, 2),
            "humidity": round(min(100.0, max(0.0, humidity)), 1),
            "battery": round(self.battery, 1),
        }

    def _step_excursion(self, dt_s: float) -> None:
        if self.excursion == 0.0 and self.rng.random() < dt_s / 600:
            self.excursion_peak = self.rng.uniform(9.0, 16.0)
            self.rising = True
        if self.rising:
            self.excursion += self.excursion_peak * dt_s / 10.0
            if self.excursion >= self.excursion_peak:
                self.excursion, self.rising = self.excursion_peak, False
        elif self.excursion > 0.0:
            self.excursion = max(0.0, self.excursion - self.excursion_peak * dt_s / 40.0)
