"""Aggregation strategies and wrappers, registered by name and chosen from the coordinator's
TOML. Third-party packages add their own through entry points:

    [project.entry-points."schoolfed.strategies"]
    my_rule = "my_package.module:MyStrategy"      # a Strategy subclass
    [project.entry-points."schoolfed.wrappers"]
    my_wrap = "my_package.module:MyWrapper"       # a Wrapper subclass
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Mapping
from typing import Any

from common.config import from_dict
from common.errors import ConfigError
from fedserver.strategy.base import (AggregateResult, ClientFailure, ClientUpdate, State, Strategy, StrategyContext,
                                     Wrapper)
from fedserver.strategy.fedavg import FFALoRA, FedAdagrad, FedAdam, FedAvg, FedAvgM, FedSALoRA, FedYogi
from fedserver.strategy.lora_aware import FedExLoRA, FLoRA, FlexLoRA, HetLoRA
from fedserver.strategy.robust import Bulyan, CentredClipping, GeometricMedian, Krum, Median, MultiKrum, TrimmedMean
from fedserver.strategy.wrappers import Clip, Compress, DifferentialPrivacy

STRATEGY_GROUP = "schoolfed.strategies"
WRAPPER_GROUP = "schoolfed.wrappers"

STRATEGIES: dict[str, type[Strategy]] = {}
WRAPPERS: dict[str, type[Wrapper]] = {}


def register(cls: type[Strategy]) -> type[Strategy]:
    table: dict[str, Any] = WRAPPERS if issubclass(cls, Wrapper) else STRATEGIES
    if cls.name in table:
        raise ValueError(f"strategy name {cls.name!r} is already registered by {table[cls.name].__name__}")
    table[cls.name] = cls
    return cls


for _cls in (FedAvg, FedAvgM, FedAdagrad, FedAdam, FedYogi, FFALoRA, FedSALoRA, FlexLoRA, HetLoRA, FLoRA, FedExLoRA,
             Median, TrimmedMean, Krum, MultiKrum, Bulyan, GeometricMedian, CentredClipping,
             Clip, DifferentialPrivacy, Compress):
    register(_cls)


def _from_entry_points(group: str, name: str, base: type) -> type | None:
    for ep in importlib.metadata.entry_points(group=group):
        if ep.name != name:
            continue
        try:
            cls = ep.load()
        except Exception as exc:
            raise ConfigError(f"strategy {name!r} from entry point {ep.value!r} failed to import: {exc}. "
                              "Fix or uninstall the package that provides it") from exc
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise ConfigError(f"entry point {name} = {ep.value!r} is not a {base.__name__} subclass")
        return cls
    return None


def available(group: str = STRATEGY_GROUP) -> list[str]:
    """Every name that can be configured: built in, plus installed entry points."""
    table = STRATEGIES if group == STRATEGY_GROUP else WRAPPERS
    return sorted({*table, *(ep.name for ep in importlib.metadata.entry_points(group=group))})


def lookup(name: str, *, wrapper: bool = False) -> type[Any]:
    table: Mapping[str, type[Any]] = WRAPPERS if wrapper else STRATEGIES
    group, base = (WRAPPER_GROUP, Wrapper) if wrapper else (STRATEGY_GROUP, Strategy)
    cls = table.get(name) or _from_entry_points(group, name, base)
    if cls is None:
        kind = "wrapper" if wrapper else "strategy"
        raise ConfigError(f"unknown {kind} {name!r}; choose one of {available(group)}")
    return cls


def _options(cls: type[Strategy], values: Mapping[str, Any], where: str) -> Any:
    return from_dict(cls.Options, dict(values), where)


def create(name: str, options: Mapping[str, Any] | None = None) -> Strategy:
    cls: type[Strategy] = lookup(name)
    return cls(_options(cls, options or {}, f"[strategy.options] for {name!r}"))


def build(section: Any) -> Strategy:
    """The configured strategy with its wrappers around it (first listed innermost).
    `section` has .name, .options and .wrappers (fedserver.config.StrategySection)."""
    strategy = create(section.name, section.options)
    for i, table in enumerate(section.wrappers):
        table = dict(table)
        wname = table.pop("name", None)
        if not isinstance(wname, str):
            raise ConfigError(f"[[strategy.wrappers]] #{i + 1}: needs name = one of {available(WRAPPER_GROUP)}")
        wcls: type[Wrapper] = lookup(wname, wrapper=True)
        wrapped = wcls(strategy, _options(wcls, table, f"[[strategy.wrappers]] #{i + 1} ({wname})"))
        problems = wrapped.compatibility()
        if problems:
            raise ConfigError(f"[[strategy.wrappers]] #{i + 1} ({wname}): " + "; ".join(problems))
        strategy = wrapped
    return strategy


__all__ = ["STRATEGIES", "WRAPPERS", "AggregateResult", "ClientFailure", "ClientUpdate", "State", "Strategy",
           "StrategyContext", "Wrapper", "available", "build", "create", "lookup", "register"]
