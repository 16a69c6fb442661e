"""Request bodies declared as JSON that are not, each failing the parser a different way."""

from __future__ import annotations

import pytest

NOT_JSON = [
    pytest.param(b"name=x", id="form-encoded"),
    pytest.param(b'{"name": "caf\xe9"}', id="not-utf-8"),
    pytest.param(b'{"name": ' + b"1" * 5_000 + b"}", id="integer-beyond-the-digit-limit"),
    pytest.param(b"[" * 10_000, id="nesting-beyond-the-recursion-limit"),
]
