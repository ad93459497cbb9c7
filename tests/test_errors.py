"""The error catalogue: one entry per code, and the docs generated from it."""

from __future__ import annotations

import re
from pathlib import Path

from pulse import errors
from pulse.errors import CATALOGUE, ApiError, markdown_table

PROTOCOL = Path(__file__).parent.parent / "docs" / "protocol.md"


def test_the_error_table_in_the_docs_is_the_catalogue() -> None:
    text = PROTOCOL.read_text()
    documented = text.split("<!-- errors:begin -->\n")[1].split("<!-- errors:end -->")[0]
    assert documented == markdown_table(), "run: python -m pulse.errors, paste into protocol.md"


def test_every_close_code_reason_in_the_docs_is_a_code_with_that_close_code() -> None:
    section = PROTOCOL.read_text().split("## Close codes")[1].split("\n## ")[0]
    rows = re.findall(r"^\| (\d{4}) \| ([^|]*) \|", section, re.MULTILINE)
    assert rows, "no close code table found"
    for close, reasons in rows:
        for reason in re.findall(r"`([a-z_]+)`", reasons):
            assert reason in CATALOGUE, reason
            assert CATALOGUE[reason].close == int(close), (reason, close)


def test_each_entry_is_well_formed_and_named_once() -> None:
    constants = [v for v in vars(errors).values() if isinstance(v, errors.ErrorCode)]
    assert sorted(e.code for e in constants) == sorted(CATALOGUE)
    for error in CATALOGUE.values():
        assert re.fullmatch(r"[a-z_]+", error.code)
        assert error.status is None or 400 <= error.status <= 599
        assert error.close in (None, 1009, 1011, 1012) or 4000 <= (error.close or 0) < 5000
        assert error.meaning.endswith(".")


def test_an_api_error_takes_its_status_close_code_and_default_detail_from_its_entry() -> None:
    error = ApiError(errors.TOKEN_EXPIRED)
    assert (error.status, error.close_code, error.code) == (401, 4001, "token_expired")
    assert error.detail == errors.TOKEN_EXPIRED.meaning
    assert ApiError(errors.UNKNOWN_DEVICE, "no d1").close_code == 1011  # not a WebSocket error
    assert ApiError(errors.HTTP_ERROR, "teapot", status=418).status == 418
