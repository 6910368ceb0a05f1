"""Download MovieLens archives from GroupLens and verify their checksums before unpacking.

Every archive is checked against the MD5 that GroupLens publishes beside it (`<archive>.md5` on
files.grouplens.org); a SHA-256 the user gives (`--sha256`) is checked as well.
"""

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

# archive -> (url, MD5 of the zip as GroupLens publishes it in <url>.md5)
ARCHIVES = {
    "ml-100k": (
        "https://files.grouplens.org/datasets/movielens/ml-100k.zip",
        "0e33842e24a9c977be4e0107933c0723",
    ),
    "ml-1m": (
        "https://files.grouplens.org/datasets/movielens/ml-1m.zip",
        "c4d9eecfca2ab87c1945afe126590906",
    ),
}


def _digest(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify(path: Path, expected_md5: str | None, expected_sha256: str | None = None) -> None:
    """Raise DataError unless the file has the expected MD5 and (when given) SHA-256."""
    for algorithm, name, expected in (
        ("md5", "MD5", expected_md5),
        ("sha256", "SHA-256", expected_sha256),
    ):
        if expected is None:
            continue
        actual = _digest(path, algorithm)
        if actual != expected.lower():
            raise DataError(f"{path}: {name} {actual} does not match the expected {expected}")


def download_movielens(
    name: str,
    dest: Path,
    url: str | None = None,
    expected_sha256: str | None = None,
    expected_md5: str | None = None,
) -> Path:
    """Download ``name`` into ``dest/<name>/``; nothing is unpacked unless the checksums match.

    `url` and `expected_md5` replace GroupLens's address and published MD5 (a mirror)."""
    if name not in ARCHIVES:
        raise DataError(f"unknown archive {name!r}; known: {', '.join(ARCHIVES)}")
    default_url, default_md5 = ARCHIVES[name]
    url, md5 = url or default_url, expected_md5 or default_md5
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        archive = Path(tmp) / f"{name}.zip"
        logger.info("downloading %s", url)
        try:
            with urllib.request.urlopen(url, timeout=60) as resp, archive.open("wb") as out:
                shutil.copyfileobj(resp, out)
        except OSError as exc:
            raise DataError(f"could not download {url}: {exc}") from None
        verify(archive, md5, expected_sha256)
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(tmp)
        target = dest / name
        if target.exists():
            shutil.rmtree(target)
        (Path(tmp) / name).rename(target)
    return target
