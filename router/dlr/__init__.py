"""Delivery receipts leaving the router for customers: HTTP webhooks
(:mod:`.webhooks`). SMPP receipts leave through the SMPP front door."""

from .webhooks import WebhookSender, sign, verify_signature, webhook_secret

__all__ = ["WebhookSender", "sign", "verify_signature", "webhook_secret"]
