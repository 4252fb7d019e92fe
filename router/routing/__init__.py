"""Destination -> country -> ordered carriers. Pure functions over a table.

The route table is built from configuration and swapped whole at runtime
(``Router.table = new``); lookups never block and never log numbers.
Country detection uses ``phonenumbers`` (metadata maintained upstream) and
caches the answer by number prefix, because parsing costs ~20 us per call.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import phonenumbers
from phonenumbers import region_code_for_country_code

from ..config import RouteEntry, RoutesConfig


class NoRoute(Exception):
    """No carrier serves this destination (or it is blocked)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def normalise_e164(raw: str) -> str | None:
    """Digits of an international number ('+45 12 34' -> '451234'), or None."""
    s = raw.strip()
    if s.startswith("+"):
        s = s[1:]
    elif s.startswith("00"):
        s = s[2:]
    if not s.isdigit() or not 7 <= len(s) <= 15 or s[0] == "0":
        return None
    return s


class CountryLookup:
    """E.164 digits -> ISO 3166 alpha-2, cached by the leading digits."""

    def __init__(self, prefix_len: int = 6, max_cache: int = 200_000) -> None:
        self.prefix_len = prefix_len
        self.max_cache = max_cache
        self._cache: dict[str, str] = {}

    def country(self, digits: str) -> str:
        key = digits[: self.prefix_len]
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        value = self._lookup(digits)
        if len(self._cache) < self.max_cache:
            self._cache[key] = value
        return value

    @staticmethod
    def _lookup(digits: str) -> str:
        try:
            num = phonenumbers.parse("+" + digits, None)
        except phonenumbers.NumberParseException:
            return ""
        region = phonenumbers.region_code_for_number(num)
        if region and region != "ZZ":
            return str(region)
        # Shared country codes (e.g. +1, +7) resolve to the main region.
        if num.country_code is None:
            return ""
        main = region_code_for_country_code(num.country_code)
        return "" if main == "ZZ" else str(main)


@dataclass(slots=True)
class RouteDecision:
    carriers: list[str]  # in the order to try
    rule: str  # which rule matched, for `routes check` and debugging


@dataclass(slots=True)
class RouteTable:
    default: list[RouteEntry] = field(default_factory=list)
    countries: dict[str, list[RouteEntry]] = field(default_factory=dict)
    prefixes: dict[str, list[RouteEntry]] = field(default_factory=dict)
    blocked_countries: frozenset[str] = frozenset()
    blocked_prefixes: tuple[str, ...] = ()
    accounts: dict[str, RouteTable] = field(default_factory=dict)
    # Lengths of the prefix overrides, longest first: a lookup tries only
    # those instead of every length up to 15.
    _prefix_lengths: tuple[int, ...] = field(default=(), init=False, repr=False)
    # Each rule's carriers grouped by priority once, not on every message.
    _default_plan: _Plan | None = field(default=None, init=False, repr=False)
    _country_plans: dict[str, _Plan] = field(default_factory=dict, init=False, repr=False)
    _prefix_plans: dict[str, _Plan] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self._prefix_lengths = tuple(sorted({len(p) for p in self.prefixes}, reverse=True))
        self._default_plan = _Plan(self.default) if self.default else None
        self._country_plans = {k: _Plan(v) for k, v in self.countries.items() if v}
        self._prefix_plans = {k: _Plan(v) for k, v in self.prefixes.items() if v}

    @classmethod
    def from_config(cls, cfg: RoutesConfig) -> RouteTable:
        return cls(
            default=list(cfg.default),
            countries=dict(cfg.countries),
            prefixes=dict(cfg.prefixes),
            blocked_countries=frozenset(b.upper() for b in cfg.blocked if not b.startswith("+")),
            blocked_prefixes=tuple(b[1:] for b in cfg.blocked if b.startswith("+")),
            accounts={name: cls.from_config(sub) for name, sub in cfg.accounts.items()},
        )

    def resolve(
        self, digits: str, country: str, rng: random.Random, account: str | None = None
    ) -> RouteDecision:
        """Carriers for a number. An account's own table is asked first (its
        blocks apply too); where it has no rule, the global table decides."""
        own = self.accounts.get(account) if account else None
        if own is not None:
            try:
                decision = own._resolve(digits, country, rng)
            except NoRoute as exc:
                if exc.reason.startswith("blocked"):
                    raise
            else:
                decision.rule = f"account {account}: {decision.rule}"
                return decision
        return self._resolve(digits, country, rng)

    def _resolve(self, digits: str, country: str, rng: random.Random) -> RouteDecision:
        for p in self.blocked_prefixes:
            if digits.startswith(p):
                raise NoRoute(f"blocked prefix +{p}")
        if country in self.blocked_countries:
            raise NoRoute(f"blocked country {country}")
        # Longest prefix override wins.
        longest = min(len(digits), 15)
        for n in self._prefix_lengths:
            if n <= longest:
                plan = self._prefix_plans.get(digits[:n])
                if plan is not None:
                    return RouteDecision(plan.order(rng), f"prefix +{digits[:n]}")
        plan = self._country_plans.get(country)
        if plan is not None:
            return RouteDecision(plan.order(rng), f"country {country}")
        if self._default_plan is not None:
            return RouteDecision(self._default_plan.order(rng), "default")
        raise NoRoute(f"no route for country {country or 'unknown'}")


class _Plan:
    """A rule's carriers, grouped by priority (lowest first) once, with each
    group's carrier names, weights and total weight, so that picking an order
    per message is only the weighted draws."""

    __slots__ = ("groups", "single")

    def __init__(self, entries: list[RouteEntry]) -> None:
        by_prio: dict[int, list[RouteEntry]] = {}
        for e in entries:
            by_prio.setdefault(e.priority, []).append(e)
        self.groups: tuple[tuple[tuple[str, ...], tuple[int, ...], int], ...] = tuple(
            (
                tuple(e.carrier for e in by_prio[prio]),
                tuple(e.weight for e in by_prio[prio]),
                sum(e.weight for e in by_prio[prio]),
            )
            for prio in sorted(by_prio)
        )
        self.single = entries[0].carrier if len(entries) == 1 else None

    def order(self, rng: random.Random) -> list[str]:
        """Carriers by priority; within a priority, a weighted random order."""
        if self.single is not None:
            return [self.single]
        out: list[str] = []
        for names, weights, total in self.groups:
            if len(names) == 1:
                out.append(names[0])
                continue
            left_names = list(names)
            left_weights = list(weights)
            while len(left_names) > 1:
                pick = rng.random() * total
                i = 0
                last = len(left_weights) - 1
                while i < last:
                    pick -= left_weights[i]
                    if pick < 0:
                        break
                    i += 1
                out.append(left_names.pop(i))
                total -= left_weights.pop(i)
            out.append(left_names[0])
        return out
