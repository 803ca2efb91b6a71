"""deliver: the last stage of the data path, from the spool to SES or the original host.

    spool.claim() -> rules classify -> ses route? -> SES (paced; circuit) --fails--+
                                                                                   v
                                       upstream (the site's original SMTP host) <--+
                  -> outcome recorded on the spool row: sent / deferred / failed

`loop` is the delivery loop (Deliverer), `outcome` writes what became of each
mail on its spool row, `dsn` says when its sender is told and `report` writes the
notice, `feedback` brings SES's events back onto the rows (and a mail SES bounced for
every recipient to `bounced`), `ses/` the SES leg (client, route, pace, circuit),
`upstream` the SMTP client for the original host (`pool` its connections kept
between mails and the host's cap on them), `task` wires them up. In `relay
serve` all of it runs in the delivery process (`process`, `python -m
relay.deliver.process`), which `supervisor` starts, watches and restarts, handing it
the settings and rules it runs on (`handover`).
"""

from relay.deliver.loop import Deliverer
from relay.deliver.ses import SesClient, SesRoute
from relay.deliver.upstream import UpstreamClient

__all__ = ["Deliverer", "SesClient", "SesRoute", "UpstreamClient"]
