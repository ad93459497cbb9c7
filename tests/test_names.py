"""The shapes of names and free text (pulse.names)."""

from __future__ import annotations

import pytest

from pulse.names import is_plain_text, is_valid_name


@pytest.mark.parametrize(
    "text",
    [
        "Boiler room 2",
        "Température > 61 °C",
        "温度センサー",
        "מדחום",  # right-to-left text needs no control character
        "حساس الحرارة",
        "🌡 probe",
        # The invisible characters real text needs (pulse.names._NEEDED):
        "می\u200cخواهم",  # noqa: RUF001 (a zero-width non-joiner inside a Persian word)
        "\U0001f469\u200d\U0001f527 tech",  # a zero-width joiner: one emoji, 👩‍🔧
        "מדחום\u200e 2",  # a left-to-right mark before a number after Hebrew
        "2 \u200fמדחום",  # noqa: RUF001 (a right-to-left mark)
        "حرارة \u061c2",  # an Arabic letter mark
        "tab-free; quotes \" ' and \\ backslash",
        "",
    ],
)
def test_visible_text_is_plain(text: str) -> None:
    assert is_plain_text(text)


@pytest.mark.parametrize(
    "text",
    [
        "a\u0000b",  # NUL: PostgreSQL refuses it
        "\u001b[2J",  # a terminal escape
        "line\nbreak",
        "\u0085next line",  # C1
        "Overheat\u202e",  # a bidirectional override
        "a\u2067b",  # an isolate
        "\ud800",  # a lone surrogate
        # Invisible (Cf, Zl, Zp): each made a name pass for another, or break its line.
        "ad\u200bmin",  # zero-width space
        "ad\u2060min",  # word joiner
        "ad\u00admin",  # soft hyphen
        "\ufeffadmin",  # byte order mark
        "admin\U000e0041",  # a tag character
        "a\u2028b",  # line separator
        "a\u2029b",  # paragraph separator
    ],
)
def test_control_and_invisible_characters_are_not_plain(text: str) -> None:
    assert not is_plain_text(text)


@pytest.mark.parametrize("name", ["d1", "a" * 64, "sensor_01.temp:c-2"])
def test_valid_names(name: str) -> None:
    assert is_valid_name(name)


@pytest.mark.parametrize("name", ["", "a" * 65, "ad\u200bmin", "dé", "a b", 5, None])
def test_invalid_names(name: object) -> None:
    assert not is_valid_name(name)
