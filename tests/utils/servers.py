"""Run a kit server (grpc.aio) on a background event loop so that tests can use blocking clients."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from recsys.rpc.server import RpcServer

T = TypeVar("T")


class BackgroundLoop:
    """An asyncio event loop running in a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


class BackgroundServer:
    """Starts an RpcServer built by `factory` on a background loop; `address` is host:port."""

    def __init__(
        self,
        factory: Callable[[], Awaitable[RpcServer]],
        *,
        serving: bool = True,
    ) -> None:
        self._loop = BackgroundLoop()
        self.server: RpcServer = self._loop.run(factory())
        self._loop.run(self.server.start())
        if serving:
            self._loop.run(self.server.set_serving(True))
        self.address = f"127.0.0.1:{self.server.port}"

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return self._loop.run(coro, timeout)

    def stop(self, grace: float = 1.0) -> None:
        self._loop.run(self.server.stop(grace))
        self._loop.close()
