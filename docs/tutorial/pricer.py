"""Tutorial service: prices a European call option by Monte Carlo simulation."""

from __future__ import annotations

import math
import random


class Pricer:
    """One instance per core; the risk-free rate is loaded once, at start-up."""

    def __init__(self, context):
        # A real service would load market data here, once per instance, not per request.
        self.rate = float(context.environment.get("RATE", "0.01"))

    def call_price(
        self,
        spot: float,
        strike: float,
        vol: float,
        years: float,
        paths: int = 10_000,
        seed: int = 0,
    ) -> float:
        """Discounted mean payoff of a European call over `paths` simulated prices."""
        rng = random.Random(seed)
        drift = (self.rate - 0.5 * vol * vol) * years
        shock = vol * math.sqrt(years)
        total = 0.0
        for _ in range(paths):
            price = spot * math.exp(drift + shock * rng.gauss(0.0, 1.0))
            total += max(price - strike, 0.0)
        return math.exp(-self.rate * years) * total / paths
