"""``@value``: an immutable dataclass for the type checker, a plain one at run time.

A ``@dataclass(frozen=True)`` instance is built by a generated ``__init__``
that sets every field through ``object.__setattr__`` (frozen classes forbid
ordinary assignment): a Python-level call per field. For the values made
once per message (:class:`router.model.Message`, 24 fields) that cost
2.8 us a message against 0.6 us for the same class not frozen (measured
with ``timeit``, 2026-12-07), several percent of the router's CPU per
message on the end-to-end path.

``@value`` keeps the promise where it is checked, at type-check time: the
``dataclass_transform(frozen_default=True)`` marker makes mypy treat every
field as read-only, so an assignment to one is a type error (``make lint``;
``tests/test_value.py`` runs mypy on such an assignment and expects the
error). At run time the class is an ordinary slotted dataclass with the
same ``__eq__`` and, through ``unsafe_hash``, the same ``__hash__`` as the
frozen one. Use it only for values built on the per-message path; elsewhere
``@dataclass(frozen=True)`` is the plainer choice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, TypeVar, dataclass_transform

_T = TypeVar("_T")


@dataclass_transform(frozen_default=True, field_specifiers=(field,))
def value(*, repr: bool = True) -> Any:  # noqa: A002 - dataclass's own name for it
    """Class decorator: ``@value()`` or ``@value(repr=False)``."""

    def wrap(cls: type[_T]) -> type[_T]:
        return dataclass(slots=True, repr=repr, unsafe_hash=True)(cls)

    return wrap
