"""Reading the YAML/JSON files that configs and concept banks live in: one parser for all of them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_structured_file(path: Path) -> Any:
    """The parsed contents of a ``.json`` file (JSON) or any other file (YAML, safe loader)."""
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        return json.loads(text)
    import yaml

    return yaml.safe_load(text)
