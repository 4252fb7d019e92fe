"""Carrier message id -> (our message, part), in memory, bounded.

Receipts may come before the submit_sm_resp is processed (the carrier is
fast, our loop is busy): such receipts wait here up to ``early_ttl``
seconds and are matched as soon as the id is known.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, TypeVar

from .receipt import CarrierReceipt, alternate_forms, normalise_carrier_id

T = TypeVar("T")


class Correlator(Generic[T]):
    def __init__(self, max_entries: int = 1_000_000, early_ttl: float = 120.0) -> None:
        self.max_entries = max_entries
        self.early_ttl = early_ttl
        self._ids: OrderedDict[str, T] = OrderedDict()
        self._early: OrderedDict[str, tuple[CarrierReceipt, float]] = OrderedDict()
        # A receipt's id is looked up and then forgotten: normalise it once.
        self._last_raw: str | None = None
        self._last_key = ""

    def _key(self, carrier_id: str) -> str:
        if carrier_id is self._last_raw:
            return self._last_key
        key = normalise_carrier_id(carrier_id)
        self._last_raw = carrier_id
        self._last_key = key
        return key

    def __len__(self) -> int:
        return len(self._ids)

    def remember(self, carrier_id: str, value: T, now: float) -> CarrierReceipt | None:
        """Store the mapping; return a receipt that was waiting for it, if any."""
        key = self._key(carrier_id)
        self._ids[key] = value
        if len(self._ids) > self.max_entries:
            self._ids.popitem(last=False)
        if self._early:
            self._expire_early(now)
            for k in (key, *alternate_forms(key)):
                waiting = self._early.pop(k, None)
                if waiting is not None:
                    return waiting[0]
        return None

    def lookup(self, carrier_id: str) -> T | None:
        key = self._key(carrier_id)
        hit = self._ids.get(key)
        if hit is not None:
            return hit
        for alt in alternate_forms(key):
            hit = self._ids.get(alt)
            if hit is not None:
                return hit
        return None

    def forget(self, carrier_id: str) -> None:
        key = self._key(carrier_id)
        if self._ids.pop(key, None) is None:
            for alt in alternate_forms(key):
                if self._ids.pop(alt, None) is not None:
                    break

    def is_parked(self, receipt: CarrierReceipt) -> bool:
        return normalise_carrier_id(receipt.carrier_id) in self._early

    def unpark(self, carrier_id: str) -> None:
        self._early.pop(normalise_carrier_id(carrier_id), None)

    def park(self, receipt: CarrierReceipt, now: float) -> None:
        """Keep a receipt whose id is not known yet."""
        self._expire_early(now)
        self._early[normalise_carrier_id(receipt.carrier_id)] = (receipt, now)
        if len(self._early) > 100_000:
            self._early.popitem(last=False)

    def _expire_early(self, now: float) -> None:
        limit = now - self.early_ttl
        while self._early:
            key, (_, at) = next(iter(self._early.items()))
            if at > limit:
                break
            del self._early[key]
