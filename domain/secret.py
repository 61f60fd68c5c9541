"""A value that cannot be printed by accident (after Hyperswitch's `masking::Secret` and
pydantic's `SecretStr`).

Card numbers, security codes and payment tokens travel inside domain objects from the API to a
provider mapping. Any `repr()`, `str()`, f-string, `%s`, traceback with locals or logging call
that meets one shows only a mask; the one way to the value is the explicit `reveal()`, which
only the code building a provider request calls. It is deliberately not a `str` subclass: a
`str` would hand its characters to concatenation, `.encode()` or a JSON serialiser without
asking; this type makes those fail instead.
"""

from __future__ import annotations

import hmac
from typing import NoReturn

__all__ = ["Secret"]

MASK = "**********"


class Secret:
    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        if not isinstance(value, str):
            raise TypeError(f"Secret holds a str, not {type(value).__name__}")
        self._value = value

    def reveal(self) -> str:
        """The value itself, for the one place that must send it (a provider request)."""
        return self._value

    def __repr__(self) -> str:
        return f"Secret('{MASK}')"

    def __str__(self) -> str:
        return MASK

    def __format__(self, spec: str) -> str:
        return format(MASK, spec)

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash((Secret, self._value))

    def __reduce__(self) -> NoReturn:
        # Pickling would write the value to wherever the pickle goes (a cache, a queue, a file).
        raise TypeError("a Secret cannot be pickled")

    def __copy__(self) -> Secret:
        return self  # immutable

    def __deepcopy__(self, memo: dict[int, object]) -> Secret:
        return self
