"""receive: the first stage of the data path, SMTP in from Moodle, 250 once spooled.

    Moodle (PHPMailer) --SMTP--> session (aiosmtpd) --> handler --> spool.add() --> 250

`session` is the aiosmtpd protocol with relay's fast paths, `data` reads DATA,
`handler` applies the limits, auth and relay rules and spools the mail,
`passwords` checks AUTH against the users file.
"""

from relay.receive.handler import Handler
from relay.receive.passwords import Users
from relay.receive.session import Session, session_factory

__all__ = ["Handler", "Session", "Users", "session_factory"]
