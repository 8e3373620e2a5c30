"""A context-local setting that costs nothing to read while no context has set it.

:class:`ScopedSetting` wraps a :class:`contextvars.ContextVar` (default None) with a count of the contexts that hold a
value. While the count is 0, :meth:`ScopedSetting.get` returns None without calling ``ContextVar.get``. That is the
state of every call outside the trainer's recording blocks, so ``torch.compile`` of a converted model traces a plain
attribute read there: torch 2.11's dynamo cannot trace ``ContextVar.get`` at all ("Dynamo does not know how to
trace method `get` of class `ContextVar`"), torch 2.14's can. Inside a block that set a value, reads go to the
ContextVar, so each thread and task still sees only its own setting.
"""
from __future__ import annotations

import contextvars
import threading
from typing import Generic, Optional, TypeVar

T = TypeVar("T")


class ScopedSetting(Generic[T]):
    """``set`` / ``reset`` / ``get`` as on a ContextVar whose default is None (module docstring)."""

    def __init__(self, name: str) -> None:
        self._var: contextvars.ContextVar[Optional[T]] = contextvars.ContextVar(name, default=None)
        self._holders = 0  # contexts between set() and reset(), in every thread
        self._lock = threading.Lock()

    def get(self) -> Optional[T]:
        """The value set in this context, or None."""
        return None if self._holders == 0 else self._var.get()

    def set(self, value: Optional[T]) -> contextvars.Token:
        """Set ``value`` in this context until :meth:`reset` with the returned token."""
        with self._lock:  # counted before the value is visible, so get() never skips a value of this context
            self._holders += 1
        return self._var.set(value)

    def reset(self, token: contextvars.Token) -> None:
        self._var.reset(token)
        with self._lock:
            self._holders -= 1
