"""The unsafe-concept bank: C categories, each expanded into N text variants (DESIGN §1A).

The shipped bank is ``data/unsafe_concepts.yaml``. Users replace it, extend it, restrict it
to some categories or allow-list categories, from a file or from Python.
"""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from pathlib import Path
from typing import Iterable, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .structured_files import read_structured_file
from .errors import ConceptBankError


class ConceptCategory(BaseModel):
    """One unsafe category z_i with its text variants z_i^n."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    description: str = ""
    variants: tuple[str, ...] = Field(min_length=1)

    @field_validator("variants")
    @classmethod
    def _non_empty(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        cleaned = tuple(v.strip() for v in value)
        if any(not v for v in cleaned):
            raise ValueError("variants: every variant must be a non-empty string")
        return cleaned


class ConceptBank(BaseModel):
    """An ordered set of unsafe categories.

    Example:
        >>> bank = ConceptBank.default()
        >>> len(bank.categories) >= 10
        True
        >>> bank.select(exclude=["weapons"]).names[:2]
        ['sexual', 'violence']
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    categories: tuple[ConceptCategory, ...] = Field(min_length=1)

    @field_validator("categories")
    @classmethod
    def _unique(cls, value: tuple[ConceptCategory, ...]) -> tuple[ConceptCategory, ...]:
        names = [c.name for c in value]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"categories: duplicate names {duplicates}")
        return value

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.categories]

    @property
    def max_variants(self) -> int:
        return max(len(c.variants) for c in self.categories)

    def fingerprint(self) -> str:
        """A hash of the texts, so cached embeddings are invalidated when the bank changes."""
        payload = json.dumps([[c.name, list(c.variants)] for c in self.categories], ensure_ascii=False)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]

    @classmethod
    def from_mapping(cls, data: Mapping, *, source: str = "<mapping>") -> "ConceptBank":
        """Build a bank from ``{"categories": {name: {"variants": [...], "description": ...}}}``.

        A list of ``{"name": ..., "variants": [...]}`` and a bare ``{name: [variants]}`` are accepted too.
        """
        raw = data.get("categories", data) if isinstance(data, Mapping) else data
        items: list[dict] = []
        if isinstance(raw, Mapping):
            for name, spec in raw.items():
                if name == "version":
                    continue
                if isinstance(spec, (list, tuple)):
                    spec = {"variants": list(spec)}
                if not isinstance(spec, Mapping):
                    raise ConceptBankError(f"{source}: category {name!r} must map to a list of variants or a mapping")
                items.append({"name": name, **spec})
        elif isinstance(raw, list):
            items = list(raw)
        else:
            raise ConceptBankError(f"{source}: expected 'categories' to be a mapping or a list")
        try:
            return cls(categories=tuple(ConceptCategory(**item) for item in items))
        except (ValidationError, TypeError) as err:
            raise ConceptBankError(f"{source}: invalid concept bank: {err}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> "ConceptBank":
        """Load a bank from a YAML or JSON file."""
        path = Path(path)
        if not path.is_file():
            raise ConceptBankError(f"concept bank file not found: {path}")
        data = read_structured_file(path)
        if not isinstance(data, (Mapping, list)):
            raise ConceptBankError(f"{path}: expected a mapping of categories")
        return cls.from_mapping(data, source=str(path))

    @classmethod
    def default(cls) -> "ConceptBank":
        """The bank shipped with the package (12 categories × 4–5 variants)."""
        import yaml

        text = resources.files("guardalign_core").joinpath("data/unsafe_concepts.yaml").read_text(encoding="utf-8")
        return cls.from_mapping(yaml.safe_load(text), source="unsafe_concepts.yaml")

    @classmethod
    def default_reference(cls) -> "ConceptBank":
        """The benign reference bank shipped with the package (the ``contrast`` rule's other side)."""
        import yaml

        text = resources.files("guardalign_core").joinpath("data/reference_concepts.yaml").read_text(encoding="utf-8")
        return cls.from_mapping(yaml.safe_load(text), source="reference_concepts.yaml")

    def extend(self, other: "ConceptBank") -> "ConceptBank":
        """Return a bank with ``other``'s categories added; a category of the same name is replaced."""
        replaced = {c.name: c for c in other.categories}
        kept = [replaced.pop(c.name, c) for c in self.categories]
        return ConceptBank(categories=tuple(kept) + tuple(c for c in other.categories if c.name in replaced))

    def select(self, include: Iterable[str] | None = None, exclude: Iterable[str] = ()) -> "ConceptBank":
        """Keep only ``include`` (if given) minus ``exclude``; unknown names raise ``ValueError``."""
        exclude = list(exclude)
        include = list(include) if include is not None else None
        unknown = sorted((set(exclude) | set(include or ())) - set(self.names))
        if unknown:
            raise ValueError(f"categories: unknown {unknown}; known: {self.names}")
        kept = [c for c in self.categories if (include is None or c.name in include) and c.name not in exclude]
        if not kept:
            raise ValueError("categories: the selection leaves no category to detect")
        return ConceptBank(categories=tuple(kept))


def bank_from_config(concepts: str | None, extra: str | None, include: list[str] | None, exclude: list[str]) -> ConceptBank:
    """Build the bank a :class:`~guardalign_core.config.DetectorConfig` describes."""
    bank = ConceptBank.from_file(concepts) if concepts else ConceptBank.default()
    if extra:
        bank = bank.extend(ConceptBank.from_file(extra))
    return bank.select(include, exclude)
