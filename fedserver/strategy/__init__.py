"""Aggregation strategies, registered by name in one plain mapping that the config selects from."""

from __future__ import annotations

from fedserver.strategy.base import AggregateResult, ClientFailure, ClientUpdate, Strategy
from fedserver.strategy.fedavg import FedAvg

STRATEGIES: dict[str, type[Strategy]] = {}


def register(cls: type[Strategy]) -> type[Strategy]:
    if cls.name in STRATEGIES:
        raise ValueError(f"strategy name {cls.name!r} is already registered by {STRATEGIES[cls.name].__name__}")
    STRATEGIES[cls.name] = cls
    return cls


register(FedAvg)


def create(name: str) -> Strategy:
    try:
        return STRATEGIES[name]()
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; choose one of {sorted(STRATEGIES)}") from None


__all__ = ["STRATEGIES", "AggregateResult", "ClientFailure", "ClientUpdate", "Strategy", "create", "register"]
