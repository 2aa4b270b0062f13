"""worker.datasets: locating Fashion-MNIST, and the checksum-verified download."""
from __future__ import annotations

import gzip
import hashlib

import pytest

from core.errors import DatasetError
from service.settings import Settings
from worker import datasets


def fake_files(directory, payload=b"not really idx"):
    directory.mkdir(parents=True, exist_ok=True)
    for name in datasets.FASHION_MNIST_SHA256:
        (directory / name).write_bytes(gzip.compress(payload + name.encode()))
    return directory


def test_data_dir_wins(tmp_path):
    settings = Settings(home=tmp_path / "home", data_dir=fake_files(tmp_path / "data"))
    assert datasets.locate_fashion_mnist(settings, system_dir=tmp_path / "none") == \
        tmp_path / "data"


def test_system_dir_then_earlier_download(tmp_path):
    settings = Settings(home=tmp_path / "home")
    system = fake_files(tmp_path / "system")
    assert datasets.locate_fashion_mnist(settings, system_dir=system) == system
    fake_files(datasets.download_dir(settings))
    assert datasets.locate_fashion_mnist(settings, system_dir=tmp_path / "none") == \
        datasets.download_dir(settings)


def test_nowhere_and_no_download_is_a_clear_error(tmp_path):
    settings = Settings(home=tmp_path / "home")
    with pytest.raises(DatasetError, match="SLIMLINE_DATA_DIR"):
        datasets.locate_fashion_mnist(settings, download=False, system_dir=tmp_path / "none")


def test_download_verifies_checksums(tmp_path, monkeypatch):
    mirror = fake_files(tmp_path / "mirror")
    settings = Settings(home=tmp_path / "home")
    url = mirror.as_uri() + "/"
    with pytest.raises(DatasetError, match="sha256"):
        datasets.locate_fashion_mnist(settings, system_dir=tmp_path / "none", mirrors=[url])
    assert not any(datasets.download_dir(settings).iterdir())  # nothing half-written

    digests = {name: hashlib.sha256((mirror / name).read_bytes()).hexdigest()
               for name in datasets.FASHION_MNIST_SHA256}
    monkeypatch.setattr(datasets, "FASHION_MNIST_SHA256", digests)
    found = datasets.locate_fashion_mnist(settings, system_dir=tmp_path / "none", mirrors=[url])
    assert found == datasets.download_dir(settings)
    assert all((found / name).read_bytes() == (mirror / name).read_bytes() for name in digests)
