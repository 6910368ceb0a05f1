"""`python -m serving.retrieval`: the retrieval service."""

from __future__ import annotations

import asyncio

from recsys.rpc.log import configure_logging
from recsys.rpc.settings import load_settings
from serving.retrieval.config import RetrievalSettings
from serving.retrieval.server import serve


def main() -> None:
    settings = load_settings(RetrievalSettings)
    configure_logging(settings.log_level, settings.log_format)
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
