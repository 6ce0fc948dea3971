"""`GET /readyz`: whether this instance can serve uploads now, for load balancers.

`/healthz` says the process answers; `/readyz` asks what it depends on (the storage, and
Redis with `--redis-url`), each within `TIMEOUT`, and answers 503 naming what
failed, so a load balancer sends uploads elsewhere until it is back. Probes that arrive
while a round of checks runs share its answer, so a storage outage never piles up calls.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .protocols.common import PROBLEM_TYPE, problem

TIMEOUT = 2.0  #: seconds each dependency has to answer

Check = Callable[[], Awaitable[None]]


class Readiness:
    def __init__(self, checks: dict[str, Check]) -> None:
        self.checks = checks
        self._round: asyncio.Task[dict[str, str]] | None = None

    async def failures(self) -> dict[str, str]:
        """What is not ready and why; empty when everything answered in time."""
        if self._round is None or self._round.done():
            self._round = asyncio.ensure_future(self._check_all())
        return await asyncio.shield(self._round)

    async def _check_all(self) -> dict[str, str]:
        results = await asyncio.gather(*(_within(check) for check in self.checks.values()))
        return {name: reason for name, reason in zip(self.checks, results, strict=True) if reason}

    async def endpoint(self, request: Request) -> Response:
        failed = await self.failures()
        if not failed:
            return JSONResponse({"status": "ready", "checks": dict.fromkeys(self.checks, "ok")})
        detail = "; ".join(f"{name}: {reason}" for name, reason in failed.items())
        checks = {name: failed.get(name, "ok") for name in self.checks}
        return problem(
            503, detail, type_=PROBLEM_TYPE + "not-ready", headers={"Retry-After": "5"}, checks=checks
        )


async def _within(check: Check) -> str | None:
    """None if `check` passes within TIMEOUT, else the reason in one line."""
    try:
        async with asyncio.timeout(TIMEOUT):
            await check()
    except TimeoutError:
        return f"no answer within {TIMEOUT:g} s"
    except Exception as error:  # any failure is a reason to take this instance out
        return str(error).splitlines()[0][:300] or type(error).__name__
    return None
