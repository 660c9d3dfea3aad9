"""Seeded synthetic card-transaction stream with about 1% fraud.

Cards have a home country and a typical spend; merchants have a category and
a country.  Fraud shows up as several noisy signals (night hours, far from
home, risky categories, online channel, bursts, large amounts), none of them
certain, so a linear model on standardized numerics plus hashed categoricals
can learn it well but not perfectly.

With ``entity_fraud`` > 0 (``streamlearn produce`` and the demo use 0.4), that share of
the fraud instead follows two patterns that the event's own fields do not reveal, and
that only the card's recent history, the model's entity aggregates, can catch:

- *card testing*: a compromised card gets a burst of small transactions within about a
  minute of event time (8 to 20 of them, 5 s apart on average), all fraud.  Each
  looks like an everyday micro-payment (legitimate cards make those too, 6% of their
  transactions, with the same amounts, hours, channels and merchants); what gives it
  away is the card's count of transactions in the last minutes and their small mean;
- *far from the usual place*: a card is used in another European country than the one
  it is always used in, with ordinary amount, hour, channel, merchant and
  ``distance_km`` (the terminal's reported distance is near-home: the fraudster spoofs
  it).  Every European country is an everyday country for some card, so the event's
  country says nothing (legitimate cards rarely travel in this mode: 1% of their
  transactions are abroad); what gives it away is that this card has no recent history in
  that country (``card_country``: card and country as one entity, whose count over the
  last hour is 0 before the event) while it has history elsewhere.

Event time ``ts`` advances 0.01 s per event (100 events per second of event time), so
each of the 20,000 cards transacts about every 200 s: about 0.3 times a minute,
3 times in ten minutes, 18 times an hour.  Aggregate windows suited to this stream are
minutes to an hour (the shipped ``streamlearn.toml`` uses 1m, 10m and 1h).
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
        entity_fraud: float = 0.0,
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
        if not 0.0 <= entity_fraud <= 1.0:
            raise ValueError(f"entity_fraud must be in [0, 1], got {entity_fraud}")
        self.entity_fraud = entity_fraud
        # Card-testing bursts in progress: global event index and card of each pending row.
        self._burst_at = np.empty(0, dtype=np.int64)
        self._burst_card = np.empty(0, dtype=np.int64)

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
        fraud = rng.random(n) < self.fraud_rate * (1.0 - self.entity_fraud)
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
        if self.entity_fraud > 0:
            fraud = self._entity_patterns(n, fraud, card, country, home, amount, distance)
        self._ts += n * 0.01
        ids = np.arange(self._next_id, self._next_id + n)
        self._next_id += n
        out = {
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
        if self.entity_fraud > 0:
            out["card_country"] = card * len(COUNTRIES) + country
        return out

    #: Card-testing bursts: 8 to 20 transactions (mean 14), a mean event-index gap of 500
    #: between them (5 s of event time), so a burst lasts about a minute.
    BURST_MIN, BURST_MAX = 8, 20
    BURST_GAP = 500.0
    #: Share of legitimate transactions that are micro-payments (as small as card tests).
    MICRO_SHARE = 0.06
    #: Share of legitimate transactions abroad with the patterns on (else 8%): a traveller's
    #: first transaction in a new country looks like the far-from-home pattern.
    ABROAD_SHARE = 0.01

    def _entity_patterns(self, n: int, fraud: np.ndarray, card: np.ndarray,
                         country: np.ndarray, home: np.ndarray, amount: np.ndarray,
                         distance: np.ndarray) -> np.ndarray:
        """Overwrite some rows (legitimate so far) with the two entity patterns, in place;
        return the new fraud mask.  Half of ``entity_fraud`` goes to each pattern."""
        rng = self.rng
        share = self.fraud_rate * self.entity_fraud / 2.0
        lo = self._next_id
        legit = ~fraud
        micro = legit & (rng.random(n) < self.MICRO_SHARE)
        amount[micro] = np.round(rng.uniform(0.5, 6.0, micro.sum()), 2)
        back = legit & (country != home) & (rng.random(n) >= self.ABROAD_SHARE / 0.08)
        country[back] = home[back]
        distance[back] -= 600.0
        # (a) card testing: start bursts here, then place every pending row that falls here.
        mean_size = (self.BURST_MIN + self.BURST_MAX) / 2.0
        starts = np.flatnonzero(rng.random(n) < share / mean_size)
        if len(starts):
            sizes = rng.integers(self.BURST_MIN, self.BURST_MAX + 1, len(starts))
            cards = rng.integers(0, len(self.card_home), len(starts))
            at = [lo + s + np.concatenate([[0.0], np.cumsum(rng.exponential(
                self.BURST_GAP, k - 1))]).astype(np.int64)
                for s, k in zip(starts, sizes, strict=True)]
            self._burst_at = np.concatenate([self._burst_at, *at])
            self._burst_card = np.concatenate([self._burst_card, np.repeat(cards, sizes)])
        due = self._burst_at < lo + n
        rows = self._burst_at[due] - lo
        tested = self._burst_card[due]
        self._burst_at, self._burst_card = self._burst_at[~due], self._burst_card[~due]
        keep = ~fraud[rows]  # a row the base pattern made fraud keeps its own story
        rows, tested = rows[keep], tested[keep]
        fraud = fraud.copy()
        fraud[rows] = True
        card[rows] = tested
        country[rows] = self.card_home[tested]
        amount[rows] = np.round(rng.uniform(0.5, 6.0, len(rows)), 2)
        distance[rows] = rng.gamma(1.2, 8.0, len(rows))
        # (b) far from the usual place: another European country, ordinary in every field.
        far = np.flatnonzero(~fraud & (rng.random(n) < share))
        fraud[far] = True
        country[far] = (home[far] + rng.integers(1, 9, len(far))) % 9
        distance[far] = rng.gamma(1.2, 8.0, len(far))
        return fraud

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
            if "card_country" in cols:
                k = int(cols["card_country"][i])
                event["card_country"] = (f"card-{k // len(COUNTRIES)}|"
                                         f"{COUNTRIES[k % len(COUNTRIES)]}")
            if cols["_missing"][i]:
                del event["distance_km"]
            if cols["_labelled"][i]:
                event["is_fraud"] = int(cols["is_fraud"][i])
            out.append(event)
        return out

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            yield from self.take(1024)
