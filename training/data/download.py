"""Download MovieLens archives from GroupLens and verify their SHA-256 before unpacking."""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
import urllib.request
import zipfile
from pathlib import Path

from training.errors import DataError

logger = logging.getLogger(__name__)

# archive -> (url, sha256 of the zip as published by GroupLens)
ARCHIVES = {
    "ml-100k": (
        "https://files.grouplens.org/datasets/movielens/ml-100k.zip",
        "50d2a982c66986937beb9ffb3aa76efe955bf3d5c6b761f4e3a7cd717c9a1fad",
    ),
    "ml-1m": (
        "https://files.grouplens.org/datasets/movielens/ml-1m.zip",
        "a6898adb50b9ca05aa231689da44c217cb524e7ebd39d264c56e2832f2c54e20",
    ),
}


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify(path: Path, expected: str) -> None:
    actual = sha256(path)
    if actual != expected:
        raise DataError(f"{path}: SHA-256 {actual} does not match the expected {expected}")


def download_movielens(name: str, dest: Path, url: str | None = None,
                       expected_sha256: str | None = None) -> Path:
    """Download ``name`` into ``dest/<name>/``; nothing is unpacked unless the checksum matches."""
    if name not in ARCHIVES:
        raise DataError(f"unknown archive {name!r}; known: {', '.join(ARCHIVES)}")
    default_url, default_sha = ARCHIVES[name]
    url, expected = url or default_url, expected_sha256 or default_sha
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        archive = Path(tmp) / f"{name}.zip"
        logger.info("downloading %s", url)
        try:
            with urllib.request.urlopen(url, timeout=60) as resp, archive.open("wb") as out:
                shutil.copyfileobj(resp, out)
        except OSError as exc:
            raise DataError(f"could not download {url}: {exc}") from None
        verify(archive, expected)
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(tmp)
        target = dest / name
        if target.exists():
            shutil.rmtree(target)
        (Path(tmp) / name).rename(target)
    return target
