"""``python -m deadletters``: the same as the ``deadletters`` console script."""

from __future__ import annotations

from deadletters.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
