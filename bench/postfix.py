"""A private Postfix instance: store-and-forward relay on a loopback port.

Everything lives in one temp dir: config_directory (main.cf, master.cf),
queue_directory and data_directory. It is started with `postfix -c DIR start`
and stopped with `postfix -c DIR stop`; the system's /etc/postfix is only read
(meta_directory: postfix-files for creating the queue directories), never
written. Local delivery is off; everything goes to `relayhost`.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench import tools

_MASTER_CF = """\
# service type  private unpriv chroot wakeup maxproc command
{host}:{port} inet n - n - {smtpd_max} smtpd
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


def _postconf(name: str) -> str:
    out = subprocess.run(
        [tools.tool("postconf"), "-h", name], capture_output=True, text=True, timeout=10
    )
    return out.stdout.strip()


class Postfix:
    """Postfix smtpd on 127.0.0.1:`port`, relaying everything to [127.0.0.1]:`relay_port`."""

    def __init__(self, workdir: Path, relay_port: int, *, smtpd_max: int = 100) -> None:
        self.root = workdir / "postfix"
        self.config = self.root / "etc"
        self.queue = self.root / "queue"
        self.data = self.root / "data"
        self.port = tools.free_port()
        self.relay_port = relay_port
        self.smtpd_max = smtpd_max
        self.maillog = self.root / "maillog"
        self.started = False
        self._master: int | None = None

    def _write_config(self) -> None:
        for folder in (self.config, self.queue, self.data):
            folder.mkdir(parents=True, exist_ok=True)
        # Postfix daemons run as mail_owner and open data_directory by its full
        # path: the bench's temp dir (mkdtemp makes it 0700) must be traversable.
        for folder in (self.root.parent, self.root):
            folder.chmod(folder.stat().st_mode | 0o711)
        self.queue.chmod(0o755)
        owner = pwd.getpwnam("postfix")
        os.chown(self.data, owner.pw_uid, owner.pw_gid)
        self.data.chmod(0o700)
        daemon_dir = tools.daemon_directory()
        if daemon_dir is None:
            raise tools.ToolMissing("postconf -h daemon_directory gave nothing")
        command_dir = Path(tools.tool("postfix")).parent
        main_cf = {
            "compatibility_level": "3.6",
            "config_directory": str(self.config),
            "queue_directory": str(self.queue),
            "data_directory": str(self.data),
            "daemon_directory": str(daemon_dir),
            "command_directory": str(command_dir),
            "shlib_directory": _postconf("shlib_directory") or "no",
            "meta_directory": _postconf("meta_directory") or "/etc/postfix",
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "myhostname": "postfix.bench.invalid",
            "mydomain": "bench.invalid",
            "myorigin": "$myhostname",
            "mydestination": "",
            "local_recipient_maps": "",
            "local_transport": "error:5.1.1 local delivery is disabled",
            "alias_maps": "",
            "alias_database": "",
            "inet_interfaces": tools.HOST,
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "relayhost": f"[{tools.HOST}]:{self.relay_port}",
            "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
            "smtp_dns_support_level": "disabled",
            "smtp_tls_security_level": "none",
            "smtpd_tls_security_level": "none",
            "biff": "no",
            "maillog_file": str(self.maillog),
            "maillog_file_prefixes": str(self.root),
            "message_size_limit": "10485760",
            "default_process_limit": str(self.smtpd_max),
            "master_service_disable": "",
            "import_environment": "MAIL_CONFIG MAIL_DEBUG LANG=C",
            # Retry quickly when the bench brings the sink back up.
            "queue_run_delay": "10s",
            "minimal_backoff_time": "10s",
            "maximal_backoff_time": "60s",
        }
        text = "".join(f"{key} = {value}\n" for key, value in main_cf.items())
        (self.config / "main.cf").write_text(text)
        master = _MASTER_CF.format(host=tools.HOST, port=self.port, smtpd_max=self.smtpd_max)
        (self.config / "master.cf").write_text(master)

    def _postfix(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k != "MAIL_CONFIG"}
        return subprocess.run(
            [tools.tool("postfix"), "-c", str(self.config), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )

    def start(self) -> Postfix:
        self._write_config()
        done = self._postfix("start")
        if done.returncode != 0:
            raise RuntimeError(
                f"postfix -c {self.config} start failed: {done.stdout}{done.stderr} (postfix "
                "prints its reason only to a terminal or syslog: run it under `script -qc`)"
            )
        self.started = True
        self._master = self.master_pid()
        try:
            tools.wait_banner(self.port, 30)
        except BaseException:
            self.stop()
            raise
        return self

    def queue_size(self, queues: tuple[str, ...] = ("incoming", "active", "deferred")) -> int:
        """Messages in those queues (files under their queue dirs)."""
        total = 0
        for name in queues:
            folder = self.queue / name
            if folder.is_dir():
                total += sum(len(files) for _, _, files in os.walk(folder))
        return total

    def wait_settled(self, timeout: float) -> bool:
        """Wait until nothing is in incoming/active (all attempted: delivered or deferred)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.queue_size(("incoming", "active")) == 0:
                return True
            time.sleep(0.2)
        return False

    def flush(self) -> None:
        """Ask the queue manager to retry deferred mail now (`postqueue -f` equivalent)."""
        self._postfix("flush", timeout=30)

    def master_pid(self) -> int | None:
        with contextlib.suppress(OSError, ValueError, IndexError):
            return int((self.queue / "pid" / "master.pid").read_text().split()[0])
        return None

    def cpu(self) -> tools.CpuTree | None:
        """CPU seconds so far of master and every daemon below it (see tools.CpuTree).

        smtpd, cleanup and smtp processes exit after max_idle / max_use and master
        reaps them, so their time is in master's cutime/cstime once they are gone.
        """
        master = self.master_pid()
        return None if master is None else tools.cpu_tree(master)

    def _ours_alive(self, pid: int) -> bool:
        """True while `pid` is a live (not zombie) process of this instance's config."""
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except (OSError, IndexError):
            return False
        return state != "Z" and f"MAIL_CONFIG={self.config}".encode() in environ

    def _wait_gone(self, pid: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self._ours_alive(pid):
                return True
            time.sleep(0.1)
        return False

    def stop(self) -> None:
        """`postfix stop`; then `postfix abort`; then SIGKILL to this instance's master."""
        if not self.started:
            return
        self.started = False
        pid = self._master or self.master_pid()
        done = self._postfix("stop", timeout=60)
        if pid is None or self._wait_gone(pid, 20):
            return
        print(f"bench: postfix stop left master {pid}: {done.stdout}{done.stderr}", file=sys.stderr)
        self._postfix("abort", timeout=30)
        if self._wait_gone(pid, 10):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)  # checked above: this instance's master
        self._wait_gone(pid, 10)

    def __enter__(self) -> Postfix:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
