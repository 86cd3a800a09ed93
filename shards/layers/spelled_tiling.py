"""A kernel tiling spelled as one letter and number a field (m64n32k128w4s5): what benchmarks,
tests and logs call it, and the tiling a name spells."""

from __future__ import annotations

import dataclasses
import re
from typing import ClassVar, TypeVar

Tiling = TypeVar("Tiling", bound="SpelledTiling")


class SpelledTiling:
    """Mixin for a frozen dataclass of int fields: LETTERS gives each field its letter, in field
    order; EXAMPLE is a name to show when one does not parse."""

    LETTERS: ClassVar[str]
    EXAMPLE: ClassVar[str]

    @property
    def name(self) -> str:
        values = dataclasses.astuple(self)  # type: ignore[call-overload]
        return "".join(f"{letter}{value}" for letter, value in zip(self.LETTERS, values))

    @classmethod
    def parse(cls: type[Tiling], name: str) -> Tiling:
        """The tiling `name` spells, every field named."""
        match = re.fullmatch("".join(rf"{letter}(\d+)" for letter in cls.LETTERS), name)
        if match is None:
            raise ValueError(f"not a {cls.__name__}: {name!r} (e.g. {cls.EXAMPLE})")
        return cls(*map(int, match.groups()))
