"""The benchmark suite, ``./scripts/benchmark`` (and ``./scripts/benchmark-ab``): not part of the
test run, but built on the tests' helpers (tests/support) for databases, vhosts and servers."""
