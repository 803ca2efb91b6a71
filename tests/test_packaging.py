"""What ships beside the code: the systemd unit (systemd-analyze verify) and the Dockerfile
(its instructions, and the commands it runs, in an install without the dev/demo extras)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from relay.receive.passwords import hash_password
from tests.support.relays import ConfigWriter
from tests.support.tls import TlsFiles

ROOT = Path(__file__).parent.parent
UNIT = ROOT / "systemd" / "relay.service"
DOCKERFILE = ROOT / "Dockerfile"
# Only what `pip install .` brings may be imported at run time: the dev and demo extras
# (and what they pull in) are made unimportable here, as in the container image.
EXTRAS = ("moto", "boto3", "pytest", "hypothesis", "cryptography", "flask", "werkzeug", "_pytest")
PLAIN = [
    sys.executable,
    "-c",
    f"""\
import sys
class Plain:
    def find_spec(self, name, path=None, target=None):
        if name.partition('.')[0] in {EXTRAS!r}:
            raise ImportError(name + ' is not installed in a plain install')
sys.meta_path.insert(0, Plain())
from relay.cli import main
sys.exit(main())
""",
]


@pytest.mark.system
def test_systemd_unit_verifies_clean(tmp_path: Path) -> None:
    """`systemd-analyze verify` on the unit (ExecStart pointed at this venv's relay, as the
    README's /opt/relay venv would be): exit 0 and not one warning about the unit."""
    analyze = shutil.which("systemd-analyze")
    assert analyze is not None, "systemd-analyze is missing (Debian package systemd)"
    relay = Path(sys.executable).parent / "relay"
    assert relay.is_file(), f"no relay script beside {sys.executable}"
    text = UNIT.read_text(encoding="utf-8")
    assert "ExecStart=/opt/relay/bin/relay serve" in text
    unit = tmp_path / "relay.service"
    unit.write_text(text.replace("/opt/relay/bin/relay", str(relay)), encoding="utf-8")
    done = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    about_unit = [line for line in (done.stdout + done.stderr).splitlines() if "relay" in line]
    assert [] == about_unit
    assert 0 == done.returncode, done.stderr


def test_systemd_unit_settings() -> None:
    """The unit is Type=notify with a watchdog, stops with SIGTERM to the main process only
    (which stops its delivery process) and waits longer than relay's own 30 s drain, reloads
    with SIGHUP, runs as its own user with its state dir."""
    lines = [line.strip() for line in UNIT.read_text(encoding="utf-8").splitlines()]
    settings = dict(line.split("=", 1) for line in lines if "=" in line and line[0] != "#")
    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "KillSignal": "SIGTERM",
        "KillMode": "mixed",
        "ExecReload": "/bin/kill -HUP $MAINPID",
        "User": "relay",
        "StateDirectory": "relay",
        "ConfigurationDirectory": "relay",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
    }
    assert expected == {k: settings.get(k) for k in expected}
    assert int(settings["TimeoutStopSec"]) > 30
    assert int(settings["WatchdogSec"]) >= 10


def test_systemd_unit_lets_the_delivery_process_lower_its_priority() -> None:
    """The unit denies @resources, which holds setpriority(2), the call under os.nice(): the
    delivery process (nice 19) would get SIGSYS at start. The last filter line allows it
    back (systemd merges the lines in order), and a denied call fails with EPERM instead of
    killing the process."""
    lines = [line.strip() for line in UNIT.read_text(encoding="utf-8").splitlines()]
    filters = [line.split("=", 1)[1] for line in lines if line.startswith("SystemCallFilter=")]
    assert ["@system-service", "~@privileged @resources", "setpriority"] == filters
    assert "SystemCallErrorNumber=EPERM" in lines


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order: continuation lines joined, comments dropped."""
    logical: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert "" == pending, "Dockerfile ends in a continuation line"
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in logical]


def only(instruction: str) -> str:
    found = [args for name, args in dockerfile() if name == instruction]
    assert 1 == len(found), f"{instruction}: {found}"
    return found[0]


def healthcheck_command() -> list[str]:
    options, _, command = only("HEALTHCHECK").partition("CMD ")
    assert "--interval=" in options and "--timeout=" in options
    argv = json.loads(command)  # exec form: no shell in the way of signals and quoting
    assert isinstance(argv, list)
    return [str(a) for a in argv]


def test_dockerfile_instructions() -> None:
    """Slim Python base; exec-form CMD `relay serve`; a non-root USER; the spool a VOLUME,
    and the default spool ($STATE_DIRECTORY); STOPSIGNAL SIGTERM; HEALTHCHECK in exec form
    asking /healthz; every COPY source, and every file RUN copies out of the checkout,
    exists."""
    assert re.fullmatch(r"python:3\.\d+-slim(-\w+)?", only("FROM")), only("FROM")
    cmd = json.loads(only("CMD"))
    assert ["relay", "serve"] == cmd[:2]
    assert only("USER") not in ("root", "0", "0:0")
    assert "/var/lib/relay" in json.loads(only("VOLUME"))
    env = " ".join(args for name, args in dockerfile() if name == "ENV").split()
    assert "STATE_DIRECTORY=/var/lib/relay" in env  # the spool without `spool:`
    assert "SIGTERM" == only("STOPSIGNAL")
    assert "/healthz" in " ".join(healthcheck_command())
    copied = [args.split()[:-1] for name, args in dockerfile() if name == "COPY"]
    # RUN's `cp relay/...` reads the copied checkout (WORKDIR /src): those paths exist too.
    run = " ".join(args for name, args in dockerfile() if name == "RUN")
    copied.append(re.findall(r"\bcp (relay/\S+)", run))
    missing = [src for sources in copied for src in sources if not (ROOT / src).exists()]
    assert [] == missing


def plain_relay(*args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*PLAIN, *args], capture_output=True, text=True, timeout=60, check=False, **kwargs
    )  # type: ignore[call-overload]


def container_config(write_config: ConfigWriter, tmp_path: Path, tls: TlsFiles) -> Path:
    """A relay.yaml as a container needs it: listen beyond loopback with auth + TLS, metrics
    on (the HEALTHCHECK asks them), the rules the image copies, SES off (no credentials)."""
    users = tmp_path / "users"
    users.write_text(f"moodle:{hash_password('s3cret', n=1024)}\n")  # relay needs one account
    return write_config(
        listen="0.0.0.0:0",
        auth={"users_file": str(users)},
        tls={"cert": str(tls.cert), "key": str(tls.key)},
        metrics="127.0.0.1:0",
        rules=str(ROOT / "relay" / "rules" / "rules.yaml"),
        ses={"enabled": False},
    )


def test_container_commands_work_without_dev_extras(
    write_config: ConfigWriter, tmp_path: Path, tls_files: TlsFiles
) -> None:
    """With moto, boto3, pytest, cryptography... unimportable: `relay --help` and `relay
    check-config` on a container config work, `relay serve` starts, and the HEALTHCHECK
    command (its port pointed at the live metrics port) says healthy; once the relay has
    stopped it says unhealthy."""
    assert 0 == plain_relay("--help").returncode
    blocked = plain_relay("demo")
    assert "relay[demo]" in blocked.stderr  # the extras really are out of reach here
    config = container_config(write_config, tmp_path, tls_files)
    checked = plain_relay("check-config", "--config", str(config))
    assert (0, f"{config}: ok") == (checked.returncode, checked.stdout.strip()), checked.stderr

    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*PLAIN, "serve", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ},
        )
    try:
        deadline = time.monotonic() + 15
        found = None
        while found is None and time.monotonic() < deadline and proc.poll() is None:
            found = re.search(r"event=metrics_listening address=\S+:(\d+)", log.read_text())
            time.sleep(0.05)
        assert found is not None, log.read_text()
        argv = healthcheck_command()
        assert "python" == argv[0]
        probe = [sys.executable, *(a.replace(":9325/", f":{found.group(1)}/") for a in argv[1:])]
        assert 0 == subprocess.run(probe, timeout=30, check=False).returncode
    finally:
        proc.terminate()
        code = proc.wait(40)
    assert 0 == code, log.read_text()
    assert 1 == subprocess.run(probe, capture_output=True, timeout=30, check=False).returncode


@pytest.mark.parametrize("path", ["relay.example.yaml"], ids=["example-config"])
def test_example_config_checks(path: str, tmp_path: Path) -> None:
    """The shipped example relay.yaml passes `relay check-config` (its rules file beside it)."""
    config = tmp_path / "relay.yaml"
    text = (ROOT / path).read_text(encoding="utf-8")
    config.write_text(text.replace("/var/lib/relay", str(tmp_path / "spool")), encoding="utf-8")
    shutil.copy(ROOT / "rules.yaml", tmp_path / "rules.yaml")
    done = plain_relay("check-config", "--config", str(config))
    assert 0 == done.returncode, done.stderr
