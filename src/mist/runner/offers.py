"""Which methods, and which of their choices, the served model runs: what the web UI offers and the HTTP service's
/v1/status lists. Told without loading the model, by asking the model cache's own refusal (`ModelCache.refusal`, the
check every face makes before a job) about each method's default settings and each of its choice parameters'
values, so what is offered and what is refused never disagree."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mist.engine.config import ProtectConfig
from mist.engine.methods import list_methods, param_specs


@dataclass(frozen=True)
class Offer:
    """methods: the names of the methods the model runs with some setting, in the registry's order. choices: for a
    choice parameter some of whose values the model cannot run (Mist's fused and semantic modes on a lone VAE), the
    values it runs. refused: why each other method is not offered (one line naming the model by its file name)."""

    methods: tuple[str, ...]
    choices: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)

    def default(self, method: str) -> str:
        """`method` when it is offered, else the first method offered."""
        return method if method in self.methods or not self.methods else self.methods[0]


def everything() -> Offer:
    """Every registered method with all its choices: what is offered when the model cannot be told (not found, not
    readable, no Ray worker answering: the job reports that)."""
    return Offer(tuple(method.name for method in list_methods()))


def model_offer(models: Any) -> Offer:
    """What the model of `models` (a `ModelCache`, or anything with its `refusal`) runs; `everything()` when it
    cannot be found or read."""
    runs: list[str] = []
    refused: dict[str, str] = {}
    allowed: dict[str, set] = {}
    for method in list_methods():
        try:
            default, by_choice = _reasons(models, method)
        except (OSError, ValueError):  # ModelNotFoundError is an OSError
            return everything()
        if default is not None and all(reason is not None for reason in by_choice.values()):
            refused[method.name] = default
            continue
        runs.append(method.name)
        for (name, value), reason in by_choice.items():
            allowed.setdefault(name, set()).update([value] if reason is None else [])
    choices = {name: _in_order(name, values) for name, values in allowed.items()}
    return Offer(tuple(runs), {name: values for name, values in choices.items() if values != _in_order(name, None)},
                 refused)


def _reasons(models: Any, method: type) -> tuple[str | None, dict[tuple[str, Any], str | None]]:
    """The refusal (None: it runs) of `method` with its defaults, and with each value of each of its choice
    parameters, by (parameter name, value)."""
    def refusal(**params: Any) -> str | None:
        return models.refusal(ProtectConfig.of(method=method.name, **params))

    return refusal(), {(spec.name, value): refusal(**{spec.name: value}) for spec in param_specs(method.Params)
                       for value in spec.choices or ()}


def _in_order(name: str, values: set | None) -> tuple[Any, ...]:
    """`values` (None: all) of the choice parameter `name`, in the order its declarations list them."""
    order = [value for method in list_methods() for spec in param_specs(method.Params) if spec.name == name
             for value in spec.choices or ()]
    return tuple(dict.fromkeys(value for value in order if values is None or value in values))
