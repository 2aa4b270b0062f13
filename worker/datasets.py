"""Where the built-in Fashion-MNIST lives: `$SLIMLINE_DATA_DIR`, Debian's
`/usr/share/datasets/fashion-mnist`, an earlier download under `<home>/data/fashion-mnist`, or a
fresh checksum-verified download there.

`python -m worker.datasets fetch` makes sure the files are present (used by `make data`).
"""
from __future__ import annotations

import hashlib
import logging
import os
import sys
import tempfile
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from core.data import FASHION_MNIST_SHA256
from core.errors import DatasetError
from service.settings import Settings, get_settings

log = logging.getLogger(__name__)

SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
MIRRORS = (
    "https://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
)


def has_fashion_mnist(directory: Path) -> bool:
    """True when all four IDX files are there (gzip-compressed or raw)."""
    return all((directory / name).is_file() or (directory / name.removesuffix(".gz")).is_file()
               for name in FASHION_MNIST_SHA256)


def download_dir(settings: Settings) -> Path:
    return settings.home / "data" / "fashion-mnist"


def candidate_dirs(settings: Settings, system_dir: Path = SYSTEM_DIR) -> list[Path]:
    dirs = [settings.data_dir / "fashion-mnist", settings.data_dir] if settings.data_dir else []
    return [*dirs, system_dir, download_dir(settings)]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _download_one(name: str, target: Path, mirrors: Sequence[str], timeout: float) -> None:
    errors = []
    for base in mirrors:
        url = base + name
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".part-")
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
                while block := resp.read(1 << 20):
                    out.write(block)
            actual = _sha256(Path(tmp))
            if actual != FASHION_MNIST_SHA256[name]:
                raise DatasetError(f"sha256 {actual} does not match the published checksum")
            os.replace(tmp, target)
            return
        except (OSError, DatasetError) as exc:  # URLError is an OSError
            errors.append(f"{url}: {exc}")
        finally:
            Path(tmp).unlink(missing_ok=True)
    raise DatasetError(f"could not download {name}: " + "; ".join(errors))


def download_fashion_mnist(directory: Path, mirrors: Sequence[str] = MIRRORS,
                           timeout: float = 60.0) -> Path:
    """Download the four files into `directory`, verifying each against its sha256."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in FASHION_MNIST_SHA256:
        target = directory / name
        if target.is_file() and _sha256(target) == FASHION_MNIST_SHA256[name]:
            continue
        log.info("downloading %s into %s", name, directory)
        _download_one(name, target, mirrors, timeout)
    return directory


def locate_fashion_mnist(settings: Settings | None = None, *, download: bool = True,
                         system_dir: Path = SYSTEM_DIR, mirrors: Sequence[str] = MIRRORS) -> Path:
    """The directory holding Fashion-MNIST, downloading it when allowed and nowhere to be found."""
    settings = settings or get_settings()
    for directory in candidate_dirs(settings, system_dir):
        if has_fashion_mnist(directory):
            return directory
    searched = ", ".join(str(d) for d in candidate_dirs(settings, system_dir))
    if not download:
        raise DatasetError(f"Fashion-MNIST not found (searched {searched}); set SLIMLINE_DATA_DIR "
                           "or install Debian's dataset-fashion-mnist package")
    try:
        return download_fashion_mnist(download_dir(settings), mirrors)
    except DatasetError as exc:
        raise DatasetError(
            f"Fashion-MNIST not found (searched {searched}) and the download failed ({exc}); "
            "put the four *-ubyte.gz files in SLIMLINE_DATA_DIR or install Debian's "
            "dataset-fashion-mnist package") from None


def main(argv: Sequence[str]) -> int:
    if list(argv) != ["fetch"]:
        print("usage: python -m worker.datasets fetch", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        print(locate_fashion_mnist())
    except DatasetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
