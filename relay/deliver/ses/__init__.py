"""The SES leg of delivery: may this mail try SES now, send it, and what became of the try.

`route` (SesRoute) decides and records the verdict, `client` (SesClient) is the
aiobotocore wire to SES, `pace` spaces sends to the account's rate, `circuit`
stops SES-routed mail from trying SES while an account-wide fault lasts.
"""

from relay.deliver.ses.circuit import Circuit, CircuitState
from relay.deliver.ses.client import Quota, SesClient
from relay.deliver.ses.pace import Pace
from relay.deliver.ses.route import Fallback, Retry, Sent, SesRoute

__all__ = [
    "Circuit",
    "CircuitState",
    "Fallback",
    "Pace",
    "Quota",
    "Retry",
    "Sent",
    "SesClient",
    "SesRoute",
]
