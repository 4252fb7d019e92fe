"""SMPP 3.4: sans-IO codec (pdu), session state machine (session), asyncio shell (transport)."""
