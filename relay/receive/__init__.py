"""receive: the first stage of the data path, SMTP in from Moodle, 250 once spooled.

    Moodle (PHPMailer) --SMTP--> session (aiosmtpd) --> handler --> spool.add() --> 250

`session` is the aiosmtpd protocol with relay's fast paths, on `handshake` (implicit
TLS, started once a connection is admitted) on `guard` (a session's hostile-client
limits: caps, timers, junk commands), with `caps` (session counts, the open-file
check); `data` reads DATA (spill to a temporary file) within `budget` (memory); `handler`
applies the limits and relay rules and spools the mail; `auth` answers AUTH, with
`passwords` (the users file) and `guesses` (slows password guessing).
"""

from relay.receive.handler import Handler
from relay.receive.passwords import Users
from relay.receive.session import Session, session_factory

__all__ = ["Handler", "Session", "Users", "session_factory"]
