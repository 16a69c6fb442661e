"""Password hashing with pwdlib, always in a bounded pool of worker threads.

New hashes are argon2id; bcrypt hashes (from an older system) still verify and are replaced by
argon2id at the next successful login. For an unknown account :meth:`verify_unknown_user` does
the same work against a dummy hash, so a wrong email costs what a wrong password costs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from pwdlib import PasswordHash
from pwdlib.exceptions import UnknownHashError
from pwdlib.hashers.argon2 import Argon2Hasher
from pwdlib.hashers.bcrypt import BcryptHasher

from shared.errors import ServiceUnavailable

logger = logging.getLogger(__name__)

T = TypeVar("T")


class HashingBusy(ServiceUnavailable):
    detail = "Too many logins and registrations at once; try again shortly"


class UnusableHash(Exception):
    """The stored hash is in no format we know (a bad import, a hand edit): no password can
    match it. The caller answers as for a wrong password and tells the operator."""


def _lower_priority(niceness: int) -> None:
    """Run this hashing thread below the event loop's priority: a login storm then takes the CPU
    the loop leaves over, and the loop answers every other request without waiting for a core
    (argon2 releases the GIL, so the CPU is what they would share). Linux schedules threads
    one by one; elsewhere this is a no-op."""
    if niceness and sys.platform.startswith("linux"):
        thread = threading.get_native_id()
        with contextlib.suppress(OSError):
            current = os.getpriority(os.PRIO_PROCESS, thread)
            os.setpriority(os.PRIO_PROCESS, thread, min(current + niceness, 19))


class PasswordHasher:
    def __init__(
        self,
        *,
        threads: int,
        queue_limit: int,
        memory_kib: int = 19 * 1024,
        time_cost: int = 2,
        parallelism: int = 1,
        niceness: int = 10,
    ) -> None:
        argon2 = Argon2Hasher(memory_cost=memory_kib, time_cost=time_cost, parallelism=parallelism)
        self._hash = PasswordHash((argon2, BcryptHasher()))
        self._executor = ThreadPoolExecutor(
            max_workers=threads,
            thread_name_prefix="password",
            initializer=_lower_priority,
            initargs=(niceness,),
        )
        self._dummy_hash = self._hash.hash(secrets.token_urlsafe(32))
        # Hashes running or waiting for a thread; past the limit, callers get a 503 at once
        # instead of queueing for ever longer.
        self._waiting = 0
        self._queue_limit = threads + queue_limit

    async def _run(self, func: Callable[[], T]) -> T:
        if self._waiting >= self._queue_limit:
            raise HashingBusy()
        self._waiting += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, func)
        finally:
            self._waiting -= 1

    async def hash(self, password: str) -> str:
        return await self._run(lambda: self._hash.hash(password))

    async def verify_and_update(self, password: str, hashed: str) -> tuple[bool, str | None]:
        """Whether ``password`` matches, and a new hash when the stored one should be replaced.

        Raises :class:`UnusableHash` (after the same work as a real check) when ``hashed`` is
        in no known format."""

        def verify() -> tuple[bool, str | None]:
            try:
                return self._hash.verify_and_update(password, hashed)
            except UnknownHashError:
                self._hash.verify(password, self._dummy_hash)  # the time a real check takes
                raise UnusableHash() from None
            except ValueError:
                # bcrypt refuses passwords over 72 bytes; such a password never matched one.
                return False, None

        return await self._run(verify)

    async def verify_unknown_user(self, password: str) -> None:
        await self._run(lambda: self._hash.verify(password, self._dummy_hash))

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
