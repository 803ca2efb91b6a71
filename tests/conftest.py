"""The suite's fixtures come from tests/support, loaded here as pytest plugins; helpers
are imported from their modules (`from tests.support.capture import CaptureServer`)."""

import pytest

# Plain `assert`s in the helpers report their values too, as in the tests.
pytest.register_assert_rewrite("tests.support")

pytest_plugins = [
    "tests.support.addresses",
    "tests.support.aws",
    "tests.support.capture",
    "tests.support.fakeses",
    "tests.support.processes",
    "tests.support.relays",
    "tests.support.spools",
    "tests.support.tls",
]
