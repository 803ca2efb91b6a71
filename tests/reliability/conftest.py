"""Fixtures of the reliability scenarios: AWS environment, capture server, fake SES."""

from __future__ import annotations

from tests.capture import capture  # noqa: F401
from tests.sesfixtures import aws_env, fake_ses  # noqa: F401
