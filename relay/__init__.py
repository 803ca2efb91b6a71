"""relay: a store-and-forward SMTP relay that sends Moodle's re-engagement mail through SES."""

__version__ = "0.1.0"
