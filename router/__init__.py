"""sms-router: SMPP and HTTP in, per-country carrier SMPP out, receipts back."""

__version__ = "0.1.0"
