"""Seeded synthetic card-transaction stream with about 1% fraud.

Cards have a home country and a typical spend; merchants have a category and
a country.  Fraud shows up as several noisy signals (night hours, far from
home, risky categories, online channel, bursts, large amounts), none of them
certain, so a linear model on standardized numerics plus hashed categoricals
can learn it well but not perfectly.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

CATEGORIES = (
    "grocery",
    "fuel",
    "restaurant",
    "pharmacy",
    "clothing",
    "transport",
    "utilities",
    "entertainment",
    "hotel",
    "books",
    "electronics",
    "jewelry",
    "gift_cards",
    "travel",
    "gaming",
    "crypto_exchange",
)
RISKY_CATEGORIES = ("electronics", "jewelry", "gift_cards", "travel", "gaming", "crypto_exchange")
COUNTRIES = ("FR", "DE", "GB", "ES", "IT", "NL", "BE", "PL", "SE", "US", "BR", "NG", "RU", "VN")
CHANNELS = ("pos", "online", "atm")


class FraudStream:
    """Reproducible generator of transaction events.

    Examples
    --------
    >>> stream = FraudStream(seed=7)
    >>> events = stream.take(20_000)
    >>> sorted(events[0])  # doctest: +NORMALIZE_WHITESPACE
    ['amount', 'card_age_days', 'card_id', 'channel', 'country', 'distance_km', 'event_id',
     'hour', 'is_fraud', 'merchant_category', 'merchant_id', 'ts', 'tx_last_hour']
    >>> bool(0.005 < np.mean([e["is_fraud"] for e in events]) < 0.02)
    True
    >>> FraudStream(seed=7).take(20_000) == events
    True
    """

    def __init__(
        self,
        seed: int = 0,
        fraud_rate: float = 0.01,
        n_cards: int = 20_000,
        n_merchants: int = 5_000,
        label_fraction: float = 1.0,
        missing_rate: float = 0.005,
    ) -> None:
        self.rng = np.random.default_rng(seed)
        rng = self.rng
        self.fraud_rate = fraud_rate
        self.label_fraction = label_fraction
        self.missing_rate = missing_rate
        self.card_home = rng.integers(0, 9, n_cards)  # home countries are European
        self.card_spend = rng.lognormal(3.3, 0.6, n_cards)
        self.card_age = rng.gamma(2.0, 400.0, n_cards)
        self.merchant_cat = rng.integers(0, len(CATEGORIES), n_merchants)
        self.merchant_country = rng.integers(0, len(COUNTRIES), n_merchants)
        self._risky = np.array([c in RISKY_CATEGORIES for c in CATEGORIES])
        self._next_id = 0
        self._ts = 1_700_000_000.0
        self.drifted = False

    def drift(self) -> None:
        """Change the world from the next event on (``streamlearn produce --drift-at``).

        The fraud pattern changes: fraudsters now use cash machines near home in the
        daytime, at everyday merchants, so the night, abroad, risky-category and online
        signals the model learned stop working; and one feature shifts: every card
        spends three times more (``amount``).

        >>> s = FraudStream(seed=1)
        >>> before = s.batch(20_000)
        >>> s.drift()
        >>> after = s.batch(20_000)
        >>> bool(np.median(after["amount"]) > 2.5 * np.median(before["amount"]))
        True
        >>> fraud = after["is_fraud"] == 1
        >>> bool((after["channel"][fraud] == 2).mean() > 0.7)
        True
        """
        if not self.drifted:
            self.drifted = True
            self.card_spend = self.card_spend * 3.0

    def batch(self, n: int) -> dict[str, np.ndarray]:
        """``n`` events as columns (NumPy arrays)."""
        rng = self.rng
        fraud = rng.random(n) < self.fraud_rate
        card = rng.integers(0, len(self.card_home), n)
        # Fraudsters favour risky merchants; everyone else shops anywhere.
        merchant = rng.integers(0, len(self.merchant_cat), n)
        risky_pool = np.flatnonzero(self._risky[self.merchant_cat])
        steer = fraud & (rng.random(n) < 0.6)
        merchant[steer] = rng.choice(risky_pool, steer.sum())
        home = self.card_home[card]
        country = np.where(rng.random(n) < 0.92, home, self.merchant_country[merchant])
        abroad = fraud & (rng.random(n) < 0.5)
        country[abroad] = rng.integers(9, len(COUNTRIES), abroad.sum())
        amount = self.card_spend[card] * rng.lognormal(0.0, 0.5, n)
        amount[fraud] *= rng.lognormal(1.0, 0.7, fraud.sum())
        hour = np.clip(rng.normal(14.0, 4.0, n), 0, 23.99)
        night = fraud & (rng.random(n) < 0.55)
        hour[night] = rng.uniform(0.0, 5.0, night.sum())
        distance = rng.gamma(1.2, 8.0, n) + np.where(country != home, 600.0, 0.0)
        distance[fraud] += rng.gamma(1.5, 300.0, fraud.sum())
        channel = rng.choice(3, n, p=[0.6, 0.35, 0.05])
        channel[fraud & (rng.random(n) < 0.6)] = 1
        burst = rng.poisson(0.3, n) + np.where(fraud, rng.poisson(2.0, n), 0)
        if self.drifted:  # the new pattern: cash machines near home, daytime, everyday shops
            safe_pool = np.flatnonzero(~self._risky[self.merchant_cat])
            merchant[fraud] = rng.choice(safe_pool, fraud.sum())
            country[fraud] = home[fraud]
            hour[fraud] = np.clip(rng.normal(13.0, 2.0, fraud.sum()), 0, 23.99)
            distance[fraud] = rng.gamma(1.2, 3.0, fraud.sum())
            channel[fraud] = np.where(rng.random(fraud.sum()) < 0.85, 2, 0)
        self._ts += n * 0.01
        ids = np.arange(self._next_id, self._next_id + n)
        self._next_id += n
        return {
            "event_id": ids,
            "card_id": card,
            "merchant_id": merchant,
            "merchant_category": self.merchant_cat[merchant],
            "country": country,
            "channel": channel,
            "amount": np.round(amount, 2),
            "hour": np.round(hour, 2),
            "distance_km": np.round(distance, 1),
            "card_age_days": np.round(self.card_age[card]),
            "tx_last_hour": burst,
            "ts": self._ts + np.arange(n) * 0.01,
            "is_fraud": fraud.astype(np.int64),
            "_labelled": rng.random(n) < self.label_fraction,
            "_missing": rng.random(n) < self.missing_rate,
        }

    def take(self, n: int) -> list[dict[str, Any]]:
        """``n`` events as JSON-ready dicts."""
        cols = self.batch(n)
        out = []
        for i in range(n):
            event: dict[str, Any] = {
                "event_id": f"tx-{cols['event_id'][i]}",
                "card_id": f"card-{cols['card_id'][i]}",
                "merchant_id": f"m-{cols['merchant_id'][i]}",
                "merchant_category": CATEGORIES[cols["merchant_category"][i]],
                "country": COUNTRIES[cols["country"][i]],
                "channel": CHANNELS[cols["channel"][i]],
                "amount": float(cols["amount"][i]),
                "hour": float(cols["hour"][i]),
                "distance_km": float(cols["distance_km"][i]),
                "card_age_days": float(cols["card_age_days"][i]),
                "tx_last_hour": int(cols["tx_last_hour"][i]),
                "ts": float(cols["ts"][i]),
            }
            if cols["_missing"][i]:
                del event["distance_km"]
            if cols["_labelled"][i]:
                event["is_fraud"] = int(cols["is_fraud"][i])
            out.append(event)
        return out

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            yield from self.take(1024)
