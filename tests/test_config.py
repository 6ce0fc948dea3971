from __future__ import annotations

import pytest

from uploadsrv.config import Settings, parse_duration, parse_size


@pytest.mark.parametrize(
    ("text", "size"),
    [("1024", 1024), ("512M", 512 << 20), ("16G", 16 << 30), ("2TiB", 2 << 40), ("1k", 1024)],
)
def test_sizes_use_binary_units(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize(
    ("text", "seconds"), [("90", 90), ("30m", 1800), ("12h", 43200), ("7d", 604800), ("never", None)]
)
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "ten", "5 parsecs", "-1G"])
def test_bad_values_are_rejected(text):
    with pytest.raises(ValueError):
        parse_size(text)


def test_environment_and_flags_combine_and_round_trip():
    settings = Settings.from_env({"UPLOADSRV_MAX_SIZE": "1G", "UPLOADSRV_EXPIRY": "never"}, port=9999)
    assert (settings.max_size, settings.expiry, settings.port) == (1 << 30, None, 9999)
    assert Settings.from_env(settings.to_env()) == settings


def test_defaults_are_safe():
    settings = Settings()
    assert settings.host == "127.0.0.1"
    assert settings.expiry is not None and settings.max_size > 0
