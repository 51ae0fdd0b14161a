"""Name -> spec tables: models, optimizers, training modes, communication strategies, compressors, readers.

Adding a model or a strategy is one registration in its own module; config validation reads the names
from here, so an unknown name fails at config time with the list of valid ones. Pure standard library.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from sparkml_dist.errors import UserError

T = TypeVar("T")


class UnknownNameError(UserError):
    """A config names something no registry entry has; the message lists the valid names."""


class Registry(Generic[T]):
    """An ordered ``name -> spec`` table for one kind of thing (``kind`` is how messages call it)."""

    def __init__(self, kind: str, key: str) -> None:
        self.kind = kind
        self.key = key
        """The config key that picks an entry, e.g. ``train.model`` (for messages)."""
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: ``@MODELS.register("logistic")`` over a class or builder function."""

        def add(spec: T) -> T:
            if name in self._entries and self._entries[name] is not spec:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = spec
            return spec

        return add

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(
                f"{self.key}={name!r} is not a known {self.kind}; registered: {', '.join(self._entries)}"
            ) from None

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)


# Where each registry's built-in entries live: importing the module registers them. Config validation
# imports these lazily, so loading a config does not import torch unless a name must be checked.
_PROVIDERS: dict[str, tuple[str, ...]] = {
    "models": ("sparkml_dist.training.models",),
    "optimizers": ("sparkml_dist.training.models",),
    "strategies": ("sparkml_dist.comm",),
    "compressors": ("sparkml_dist.comm",),
    "modes": ("sparkml_dist.training.loop", "sparkml_dist.training.train", "sparkml_dist.training.feature_parallel"),
    "readers": ("sparkml_dist.training.readers",),
}


def load(name: str) -> Registry:
    """The registry ``name`` (``models``, ``optimizers``, ``strategies``, ``compressors``, ``modes``,
    ``readers``), filled."""
    modules = [importlib.import_module(m) for m in _PROVIDERS[name]]
    return getattr(modules[0], name.upper())
