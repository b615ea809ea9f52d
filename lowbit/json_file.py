"""Reading a user's JSON file (a hardware config, a compression config) with a named error for each way it fails."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_json(path: Path, error: type[Exception], *, missing: str, what: str) -> Any:
    """The JSON in `path`; `error(missing)` when it is not a file, `error("<what> is not valid JSON: ...")` when
    it does not parse."""
    if not path.is_file():
        raise error(missing)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise error(f"{what} is not valid JSON: {e}") from None
