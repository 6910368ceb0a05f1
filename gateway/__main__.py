"""`python -m gateway`: the recommendation gateway."""

from __future__ import annotations

import asyncio

from gateway.config import GatewaySettings
from gateway.server import serve
from recsys.rpc.log import configure_logging
from recsys.rpc.settings import load_settings


def main() -> None:
    settings = load_settings(GatewaySettings)
    configure_logging(settings.log_level, settings.log_format)
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
