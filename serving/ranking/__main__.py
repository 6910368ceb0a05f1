"""Run the ranking service: `python -m serving.ranking` (or `python -m serving`, `recsys-ranker`)."""

from __future__ import annotations

import asyncio
import logging
import sys

from recsys.rpc.log import configure_logging
from recsys.rpc.settings import load_settings
from serving.ranking.config import RankingSettings
from serving.ranking.model import ProviderUnavailable
from serving.ranking.server import serve

logger = logging.getLogger("serving.ranking")


def main(argv: list[str] | None = None) -> int:
    settings = load_settings(RankingSettings, argv)
    configure_logging(settings.log_level, settings.log_format)
    try:
        asyncio.run(serve(settings))
    except ProviderUnavailable as exc:
        logger.error("Cannot start: %s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
