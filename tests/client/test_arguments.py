"""The client commands' arguments: the server and token from the environment, and wrong
values refused by the parser in one line (argparse's exit status 2), before anything
starts."""

from __future__ import annotations

import pytest

from pulse.cli import build_parser

COMMANDS = (["tail"], ["export", "--device", "d1"], ["simulate"])


@pytest.mark.parametrize("command", COMMANDS)
def test_url_and_token_default_to_the_environment(
    command: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PULSE_URL", "https://pulse.example:8443")
    monkeypatch.setenv("PULSE_TOKEN", "a.jwt.token")
    args = build_parser().parse_args(command)
    assert (args.url, args.token) == ("https://pulse.example:8443", "a.jwt.token")
    given = build_parser().parse_args([*command, "--url", "http://h:1", "--token", "t"])
    assert (given.url, given.token) == ("http://h:1", "t")


@pytest.mark.parametrize("command", COMMANDS)
def test_without_the_environment_there_is_no_default(
    command: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PULSE_URL", raising=False)
    monkeypatch.delenv("PULSE_TOKEN", raising=False)
    args = build_parser().parse_args(command)
    assert (args.url, args.token) == (None, None)  # the command's own: $PORT, a minted token


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["tail", "--url", "127.0.0.1:8000"], "'127.0.0.1:8000' is not a server's address"),
        (["export", "--device", "d", "--url", "ftp://h"], "'ftp://h' is not a server's address"),
        (["simulate", "--url", "http://"], "'http://' is not a server's address"),
        # A port that is none was a traceback (OverflowError, httpx.InvalidURL).
        (["tail", "--url", "http://127.0.0.1:99999"], "is not a server's address"),
        (["export", "--device", "d", "--url", "http://h:abc"], "is not a server's address"),
        # A query was merged into every request: the dashboard's page answered SSE's.
        (["tail", "--url", "http://127.0.0.1:8000?x=1"], "is not a server's address"),
        # `--device "$DEV"` with DEV unset streamed every device.
        (["tail", "--device", ""], "'' names none"),
        (["tail", "--metric", " , "], "names none"),
        # A negative timeout meant "for ever", a negative wait "not at all": refused.
        (["tail", "--connect-timeout", "-1"], "is not 0 or a positive number of seconds"),
        (["export", "--device", "d", "--wait", "-5"], "is not 0 or a positive number"),
        (["tail", "--count", "0"], "--count: 0 is not a positive whole number"),
        # Pasted into the URL's path: other endpoints answered (the review of 8 December).
        (["export", "--device", ".."], "--device: '..' is not a device id: 1 to 64 of"),
        (["export", "--device", "h2?x=1"], "'h2?x=1' is not a device id"),
        (["export", "--device", "../devices"], "'../devices' is not a device id"),
        # A read timeout of its own (--read-timeout 0: wait for ever).
        (["export", "--device", "d", "--read-timeout", "-1"], "is not 0 or a positive number"),
        (["demo", "--rate", "0"], "--rate: 0 is not a positive number"),
        (["demo", "--rate", "nan"], "--rate: nan is not a positive number"),
        (["simulate", "--devices", "-1"], "--devices: -1 is not a positive whole number"),
        (["simulate", "--duration", "-3"], "--duration: -3 is not a positive number"),
        (["token", "--lifetime", "-5"], "--lifetime: -5 is not a positive number"),
        # Minted, and refused by the server (exit 0 before).
        (["token", "--tenant", "bad tenant!"], "is not a tenant id: 1 to 64 of [A-Za-z0-9_.:-]"),
        (["token", "--tenant", ".."], "is not a tenant id"),
        (["token", "--tenant", ""], "is not a tenant id"),
        (["token", "--lifetime", "1e300"], "would end past the year 9999"),
    ],
)
def test_wrong_values_are_refused_in_one_line(
    argv: list[str], said: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(argv)
    assert exited.value.code == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith(f"pulse {argv[0]}: error: argument ") and said in last, last


def test_a_bad_pulse_url_is_refused_like_a_bad_url(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PULSE_URL", "localhost:8000")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["tail"])
    assert "'localhost:8000' is not a server's address" in capsys.readouterr().err
