"""Protection methods: one module each, and the registry every face reads (command line, web UI, Python API,
metadata).

    >>> from mist.engine.methods import list_methods, get_method
    >>> [method.name for method in list_methods()]          # the default, Mist v1.2, first

A new method is one module: a `Method` subclass with its `MethodParams` dataclass, decorated with `register_method`.
Methods shipped with Mist are imported on the first lookup (modules named in BUILT_IN); other packages can add theirs
through the `mist.methods` entry-point group. Importing this package imports no PyTorch.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from mist.engine.methods.base import (PARTS, Loss, LossTerms, Method, MethodParams, ParamSpec, SurrogateLoss,
                                      TileInputs, param, param_specs)

__all__ = ["DEFAULT_METHOD", "Loss", "LossTerms", "Method", "MethodParams", "ParamSpec", "SurrogateLoss", "TileInputs",
           "get_method", "list_methods", "param", "param_specs", "register_method", "shared_params"]

DEFAULT_METHOD = "mist"
# Modules of this package, in the order users see their methods.
BUILT_IN = ("mist", "advdm", "photoguard", "sds", "mist2", "pid", "aspl", "mist2_lora")
# Settings of every run (ProtectConfig's own fields); a method parameter may not take one of these names.
RESERVED = frozenset({"method", "params", "epsilon", "steps", "step_size", "input_size", "block_num", "keep_aspect",
                      "mask", "seed", "precision", "original_size", "robust", "eot_samples", "shape", "start",
                      "step_schedule", "against", "against_combine", "preset", "device", "model", "batch_size",
                      "text_encoders"})

_registry: dict[str, type[Method]] = {}
_loaded = False


def register_method(cls: type[Method]) -> type[Method]:
    """Add a method (use as a class decorator). Refuses a name taken by another method, a parameter named like a
    run setting, an unknown model part, and a parameter whose flag another method declares with another kind."""
    for attribute in ("name", "title", "summary", "paper", "Params", "parts"):
        if not hasattr(cls, attribute):
            raise TypeError(f"{cls.__name__}: a method must set {attribute}")
    if not cls.name.replace("-", "").replace("_", "").isalnum() or cls.name != cls.name.lower():
        raise ValueError(f"{cls.name!r}: a method name is lower-case letters, digits, - and _")
    existing = _registry.get(cls.name)
    if existing is not None and existing is not cls:
        raise ValueError(f"method {cls.name!r} is registered already (by {existing.__module__})")
    if not set(cls.parts) <= PARTS:
        raise ValueError(f"{cls.name}: unknown model parts {sorted(set(cls.parts) - PARTS)} (known: {sorted(PARTS)})")
    shared = {spec.flag: spec for other in _registry.values() if other is not cls for spec in param_specs(other.Params)}
    for spec in param_specs(cls.Params):
        if spec.name in RESERVED:
            raise ValueError(f"{cls.name}: parameter {spec.name!r} has the name of a run setting")
        other = shared.get(spec.flag)
        if other is not None and (other.name, other.kind, other.choices) != (spec.name, spec.kind, spec.choices):
            raise ValueError(f"{cls.name}: parameter {spec.name!r} uses the flag {spec.flag} of another method's "
                             f"parameter {other.name!r} with another meaning")
    names = {spec.name for spec in param_specs(cls.Params)}
    strange = sorted(set(cls.paper_preset) - names - RESERVED)
    if strange:
        raise ValueError(f"{cls.name}: paper_preset names {strange[0]!r}, neither a run setting nor a parameter")
    _registry[cls.name] = cls
    return cls


def _load_built_in() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in BUILT_IN:
        importlib.import_module(f"{__name__}.{module}")
    for entry in entry_points(group="mist.methods"):
        entry.load()  # the module registers its methods when imported


def list_methods() -> list[type[Method]]:
    """Every registered method: the built-in ones in BUILT_IN's order, then plug-ins in the order they registered."""
    _load_built_in()
    return list(_registry.values())


def get_method(name: str) -> type[Method]:
    """The method called `name`; ValueError("method: ...") naming the choices when there is none."""
    _load_built_in()
    try:
        return _registry[name]
    except KeyError:
        raise ValueError(f"method: unknown method {name!r} (choose from {', '.join(_registry)})") from None


def shared_params() -> dict[str, tuple[ParamSpec, list[str]]]:
    """Every parameter name of every method, with its declaration (the first method's) and the methods that take it:
    the command line has one flag, and the web UI one control, per name."""
    found: dict[str, tuple[ParamSpec, list[str]]] = {}
    for method in list_methods():
        for spec in param_specs(method.Params):
            found.setdefault(spec.name, (spec, []))[1].append(method.name)
    return found
