"""AWS for the tests, never the real one: dummy credentials, a moto server, one aiobotocore
session.

Fixtures (a pytest plugin of tests/conftest.py): `aws_env` (dummy credentials, nothing
from the host's AWS set-up), `moto_server` (its URL, VERIFIED_DOMAIN verified),
`aio_session`. `moto_raw_messages(url)` reads what moto stored for SendRawEmail;
`new_queue(url)` makes an SQS queue for SES events there, `sqs(url)` is a client of it.
"""

from __future__ import annotations

import json
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from aiobotocore.session import AioSession, get_session
from moto.server import ThreadedMotoServer

REGION = "eu-west-1"
VERIFIED_DOMAIN = "moodle.example.org"


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


def sqs(url: str) -> Any:
    """A boto3 SQS client of the moto server at `url`."""
    return boto3.client("sqs", region_name=REGION, endpoint_url=url)


def new_queue(url: str, visibility: int = 30) -> str:
    """A new SQS queue on the moto server at `url`: its URL (for `ses.events.queue_url`)."""
    name = f"ses-events-{uuid.uuid4().hex[:8]}"
    attrs = {"VisibilityTimeout": str(visibility)}
    queue_url: str = sqs(url).create_queue(QueueName=name, Attributes=attrs)["QueueUrl"]
    return queue_url
