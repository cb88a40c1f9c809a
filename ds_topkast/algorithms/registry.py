"""The algorithms a "topkast" section may name, and the checks every one of them shares.

`register(cls)` makes an `Algorithm` subclass available under its `name`; the config
validates the section against the registered classes (their defaults, their own settings,
their checks), and `algorithm_for(cfg)` builds the one the section names.
"""
from __future__ import annotations

from typing import Any

from ds_topkast.algorithms.base import Algorithm

_REGISTERED: dict[str, type[Algorithm]] = {}


def register(cls: type[Algorithm]) -> type[Algorithm]:
    """Make `cls` available as `"algorithm": cls.name` (usable as a class decorator)."""
    if not (isinstance(cls, type) and issubclass(cls, Algorithm)) or not cls.name:
        raise TypeError(f"register() takes an Algorithm subclass with a name, got {cls!r}.")
    known = _REGISTERED.get(cls.name)
    if known is not None and known is not cls:
        raise ValueError(f"An algorithm named {cls.name!r} is registered already ({known.__qualname__}); give "
                         f"{cls.__qualname__} another name.")
    _REGISTERED[cls.name] = cls
    return cls


def names() -> list[str]:
    """The registered algorithms' names, in the order they were registered."""
    return list(_REGISTERED)


def algorithm_class(name: str) -> type[Algorithm]:
    """The class registered as `name`; a ValueError that lists the registered names otherwise."""
    try:
        return _REGISTERED[name]
    except (KeyError, TypeError):
        listed = [repr(n) for n in _REGISTERED]
        choices = ", ".join(listed[:-1]) + f" or {listed[-1]}" if len(listed) > 1 else listed[0]
        raise ValueError(f"Input should be {choices} (or an algorithm registered with "
                         "ds_topkast.algorithms.register)") from None


def algorithm_for(cfg) -> Algorithm:
    """The algorithm a validated "topkast" section names."""
    return algorithm_class(cfg.algorithm)(cfg)


def fill_defaults(section: dict[str, Any]) -> dict[str, Any]:
    """The raw section with the named algorithm's defaults filled in; an unknown name is left to validation."""
    name = section.get("algorithm", "topkast")
    cls = _REGISTERED.get(name) if isinstance(name, str) else None
    return cls.fill_defaults(section) if cls is not None else section


def _owners(key: str) -> list[str]:
    """The registered algorithms that read `key`: the one that declares it first, then those that inherit it."""
    owners = [cls for cls in _REGISTERED.values() if key in cls.settings]
    return [cls.name for cls in sorted(owners, key=lambda cls: len(cls.__mro__))]


def check_settings(cfg) -> None:
    """Refuse settings the chosen algorithm cannot honour, naming the fix (a ValueError, run at validation)."""
    cls = algorithm_class(cfg.algorithm)
    declared = {key for other in _REGISTERED.values() for key in other.settings}
    for key in sorted(declared - set(cls.settings), key=list(type(cfg).model_fields).index):
        if cfg.explicitly_set(key) and getattr(cfg, key) != type(cfg).model_fields[key].default:
            raise ValueError(f'{key} applies to algorithm {" / ".join(_owners(key))} only, not {cls.name!r}; '
                             "remove it.")
    if not cls.reselects_forward and cfg.explicitly_set("forward_interval") and cfg.forward_interval != 0:
        readers = " / ".join(name for name, other in _REGISTERED.items() if other.reselects_forward)
        raise ValueError(f"forward_interval re-selects A inside B, which only {readers} does; remove it for "
                         f"{cls.name!r}.")
    cls.check(cfg)
    if cfg.new_entries == "per_entry_bias_correction" and not cls.adds_entries:
        raise ValueError(f"new_entries 'per_entry_bias_correction' changes nothing for {cls.name!r}, which never adds "
                         "entries to B; remove it.")
