"""Everything the tests share, in one place: the peers relay talks to, the mails it gets,
and the helpers that drive it and wait for it.

Peers (real wire, port 0, each on its own thread):

- `capture`: the "original host", an aiosmtpd server that keeps what it gets
  (plain, STARTTLS or implicit TLS, AUTH if asked); also `python -m tests.support.capture`;
- `fakeses/`: a fake of SES (v1 Query API, SESv2 REST-JSON) for what moto cannot produce
  (model: faults and records, fake: state and actions, wire: the HTTP handler);
  also `python -m tests.support.fakeses` (the bench runs it);
- `fakedns`: a tiny authoritative DNS server;
- `aws`: dummy AWS credentials, a moto server, one aiobotocore session;
- `phpmailer`: Moodle's own client (PHPMailer under php-cli) and what it puts on the wire.

relay itself:

- `relays`: relay.yaml (`write_config`) and the service in the test's event loop
  (`start_relay`);
- `processes`: `relay serve` as a child process (`relay_process`), `relay_cli`;
- `operate`: rules to reload, the metrics endpoint of a running `relay serve`;
- `tls`: a self-signed certificate (`tls_files`).

Mail and load:

- `mails`: mails built in code; `corpus`: tests/corpus and where each mail must go;
- `smtp`: sending into the relay (`send`, `asend`, `try_send`); `load`: client threads
  that keep sending and the tally at the end;
- `spools`: the spool's rows seen from outside; `waits`: polling with a deadline;
  `ports`: a free loopback port.

The modules that define fixtures are pytest plugins, listed in `pytest_plugins` in
tests/conftest.py; a test asks for a fixture by its argument name and imports
everything else from its module.
"""
