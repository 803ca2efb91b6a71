"""Fixtures for the SES tests: AWS environment, a moto server, a fake SES, a sample mail.

Import the fixtures you use into the test module (`from tests.sesfixtures import
moto_server`); they are not in conftest.py.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from aiobotocore.session import AioSession, get_session
from moto.server import ThreadedMotoServer

from relay.mail import Mail
from tests.fakeses import FakeSes

REGION = "eu-west-1"
VERIFIED_DOMAIN = "moodle.example.org"

RAW = (
    b"Date: Mon, 2 Mar 2026 10:00:00 +0000\r\n"
    b'To: "Ada Student" <ada@example.net>\r\n'
    b'From: "Support (via Example Moodle)" <noreply@moodle.example.org>\r\n'
    b"Subject: We miss you in COURSE101\r\n"
    b"Message-ID: <5f1a2b3c4d5e63.12345678@moodle.example.org>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"\r\n"
    b"Hello Ada,\r\n"
    b".a line that starts with a dot\r\n"
    b"Come back to the course.\r\n"
)
TRACE = (
    b"Received: from moodle (localhost [127.0.0.1]) by relay; Mon, 2 Mar 2026 10:00:00 +0000\r\n"
)


def make_mail(**changes: Any) -> Mail:
    """A re-engagement-like mail from the verified domain; keyword arguments override fields."""
    fields: dict[str, Any] = {
        "id": "Q1",
        "sender": f"noreply@{VERIFIED_DOMAIN}",
        "recipients": ("ada@example.net",),
        "raw": RAW,
        "trace": TRACE,
    }
    fields.update(changes)
    return Mail(**fields)


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Dummy credentials; no retry settings, config files or instance metadata from the host."""
    for name in (
        "AWS_RETRY_MODE",
        "AWS_MAX_ATTEMPTS",
        "AWS_PROFILE",
        "AWS_SESSION_TOKEN",
        "AWS_DEFAULT_REGION",
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_SES",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIATESTTESTTESTTEST")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test-secret-not-real")


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    """A moto server on port 0 with VERIFIED_DOMAIN verified; yields its URL."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    client = boto3.client(
        "ses",
        region_name=REGION,
        endpoint_url=url,
        aws_access_key_id="AKIATESTTESTTESTTEST",
        aws_secret_access_key="test",
    )
    client.verify_domain_identity(Domain=VERIFIED_DOMAIN)
    try:
        yield url
    finally:
        server.stop()


def moto_raw_messages(url: str) -> list[dict[str, Any]]:
    """What moto stored for SendRawEmail: dicts with id, source, destinations, raw_data."""
    with urllib.request.urlopen(f"{url}/moto-api/data.json", timeout=10) as response:
        data = json.load(response)
    messages: list[dict[str, Any]] = data["ses"]["RawMessage"]
    return messages


@pytest.fixture(scope="session")
def aio_session() -> AioSession:
    """One aiobotocore session for the test run: it caches the SES service model.

    It also caches credentials once resolved; a test about the credential chain
    needs its own session.
    """
    return get_session()


@pytest.fixture
def fake_ses() -> Iterator[FakeSes]:
    """A fresh fake SES on port 0 for one test."""
    with FakeSes() as fake:
        yield fake
