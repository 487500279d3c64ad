"""redact: no password, query value or DSN secret survives; the rest of a URL stays readable."""

from __future__ import annotations

import io
import json
import logging
import sys
from urllib.parse import quote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kaiju_tasks import logs, redact

SECRET = "S3CRET"


@pytest.mark.parametrize(
    ("given_url", "shown"),
    [
        (
            "http://svc:pw-S3CRET@127.0.0.1:8080/rpc?api_key=K-S3CRET",
            "http://svc:***@127.0.0.1:8080/rpc?api_key=***",
        ),
        ("postgresql://u:S3CRET@db:5432/x", "postgresql://u:***@db:5432/x"),
        (
            "postgresql://u@db/x?password=S3CRET&sslmode=require",
            "postgresql://u@db/x?password=***&sslmode=***",
        ),
        ("http://h/rpc?S3CRET&a=1&&b", "http://h/rpc?***&a=***&&***"),
        ("http://h/rpc#token=S3CRET", "http://h/rpc"),
        ("http://:S3CRET@h/", "http://:***@h/"),
        ("http://u:pw@[::1]:80/x?k=S3CRET", "http://u:***@[::1]:80/x?k=***"),
        (
            "postgresql://h1:5432,h2:5433/db?password=S3CRET",
            "postgresql://h1:5432,h2:5433/db?password=***",
        ),
        # unencoded '@', '/', '?', '#' in a password
        ("http://svc:p@S3CRET@host/rpc", "http://svc:***@host/rpc"),
        ("http://svc:pa/S3CRET@host/rpc", "http://svc:***@host/rpc"),
        ("http://svc:pa?S3CRET@host/rpc", "http://svc:***@host/rpc"),
        ("http://svc:pa#S3CRET@host/rpc", "http://svc:***@host/rpc"),
        # a port that is not a number (a URL cut short inside its password)
        ("http://svc:S3CRET", "http://***"),
        ("http://svc:pw-S3CRET@h:notaport/x?k=S3CRET", "http://svc:***@h:notaport/x?k=***"),
        ("http://[bad/x?a=S3CRET", "http://***"),
        # key/value DSNs
        ("host=db password=S3CRET user=u", "host=db password=*** user=u"),
        (
            "host=db password='a b S3CRET' sslpassword=S3CRET passfile=/S3CRET",
            "host=db password=*** sslpassword=*** passfile=***",
        ),
    ],
)
def test_url_hides_every_secret(given_url, shown):
    assert redact.url(given_url) == shown
    assert SECRET not in redact.url(given_url)


@pytest.mark.parametrize(
    "plain",
    ["http://host:8080/rpc", "https://medium.com/@me", "postgresql://postgres@127.0.0.1/db", "x"],
)
def test_url_without_secrets_reads_as_given(plain):
    assert redact.url(plain) == plain


def test_text_redacts_every_url_and_dsn_setting_in_a_sentence():
    message = (
        "cannot reach http://svc:pw-S3CRET@h/rpc?api_key=K-S3CRET: refused; "
        "(http://u:S3CRET@h/x), 'https://h/y?t=S3CRET'. dsn host=db PASSWORD = S3CRET"
    )
    assert redact.text(message) == (
        "cannot reach http://svc:***@h/rpc?api_key=***: refused; "
        "(http://u:***@h/x), 'https://h/y?t=***'. dsn host=db PASSWORD = ***"
    )


def test_text_without_secrets_is_the_same_string():
    message = "Stage finished event=stage_finished task_id=t stage=1 passed=yes"
    assert redact.text(message) is message


@given(
    user=st.text(alphabet="abcdefghij", min_size=1, max_size=8),
    password=st.text(min_size=0, max_size=20),
    key=st.text(alphabet="abcxyz_", min_size=1, max_size=8),
    value=st.text(min_size=0, max_size=20),
)
def test_no_encoded_secret_survives(user, password, key, value):
    secret_password = SECRET + password
    secret_value = SECRET + value
    for given_url in (
        f"http://{user}:{quote(secret_password, safe='')}@host:80/rpc?{key}={quote(secret_value)}",
        f"http://{user}:{quote(secret_password, safe='')}@host/rpc?a=1&{key}={quote(secret_value)}",
    ):
        assert SECRET not in redact.url(given_url)
        assert SECRET not in redact.text(f"cannot reach {given_url}: refused")


@given(password=st.text(alphabet="abc/?#@:=&%", min_size=1, max_size=12))
def test_no_raw_password_survives(password):
    """A password written without encoding, whatever URL characters it holds."""
    given_url = f"http://svc:{SECRET}{password}@host/rpc?api_key={SECRET}"
    assert SECRET not in redact.url(given_url)
    assert SECRET not in redact.text(f"error: {given_url}")


def _format(formatter: logging.Formatter, message: str, *args: object, **extra: object) -> str:
    record = logging.makeLogRecord({"msg": message, "args": args, "levelname": "INFO", **extra})
    return formatter.format(record)


def test_text_and_json_lines_hide_secrets_of_the_message_extras_and_traceback():
    url = "http://svc:pw-S3CRET@h/rpc?api_key=K-S3CRET"
    try:
        raise ValueError(f"bad {url}")
    except ValueError:
        exc_info = sys.exc_info()
    text_formatter = logs.TextFormatter("%(levelname)s %(name)s: %(message)s")
    record = logging.makeLogRecord(
        {"msg": "reaching %s", "args": (url,), "error": f"at {url}", "exc_info": exc_info}
    )
    line = text_formatter.format(record)
    assert SECRET not in line
    assert "http://svc:***@h/rpc?api_key=***" in line
    assert "ValueError" in line
    record = logging.makeLogRecord(
        {
            "msg": "reaching %s",
            "args": (url,),
            "error": f"at {url}",
            "detail": {"dsn": "host=db password=S3CRET"},
            "exc_info": exc_info,
        }
    )
    body = json.loads(logs.JsonFormatter().format(record))
    assert SECRET not in json.dumps(body)
    assert body["message"] == "reaching http://svc:***@h/rpc?api_key=***"
    assert body["error"] == "at http://svc:***@h/rpc?api_key=***"
    assert body["detail"] == {"dsn": "host=db password=***"}
    assert "ValueError" in body["exc_info"]


def test_lines_without_secrets_are_written_as_before():
    line = _format(logs.TextFormatter("%(message)s"), "done %s", "x", event="e", n=1)
    assert line == "done x event=e n=1"
    body = json.loads(_format(logs.JsonFormatter(), "done %s", "x", event="e", n=1))
    assert (body["message"], body["event"], body["n"]) == ("done x", "e", 1)


def test_redact_filter_cleans_records_for_any_handler():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(logs.RedactFilter())
    handler.setFormatter(logging.Formatter("%(message)s %(error)s"))
    logger = logging.getLogger("tests.redact")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning(
            "calling %s", "http://u:S3CRET@h/?k=S3CRET", extra={"error": "password=S3CRET"}
        )
        try:
            raise RuntimeError("postgresql://u:S3CRET@db/x")
        except RuntimeError:
            logger.exception("failed", extra={"error": "-"})
    finally:
        logger.removeHandler(handler)
    written = stream.getvalue()
    assert SECRET not in written
    assert "calling http://u:***@h/?k=*** password=***" in written
    assert "RuntimeError: postgresql://u:***@db/x" in written


def test_a_connect_failure_without_text_is_named_by_its_kind() -> None:
    assert redact.connect_failure(ConnectionResetError()) == (
        "cannot connect to the database: ConnectionResetError"
    )
