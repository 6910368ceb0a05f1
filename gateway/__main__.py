"""`python -m gateway`: the recommendation gateway."""

from __future__ import annotations

import asyncio

from gateway.config import GatewaySettings
from gateway.server import serve
from recsys.rpc.log import configure_logging
from recsys.rpc.settings import SettingsConflict, load_settings, refuse


def main() -> None:
    settings = load_settings(GatewaySettings)
    configure_logging(settings.log_level, settings.log_format)
    try:
        asyncio.run(serve(settings))
    except SettingsConflict as exc:
        refuse(f"invalid settings for {GatewaySettings.__name__}: {exc}")


if __name__ == "__main__":
    main()
