"""PostgreSQL: migrations, the traffic-log writer, accounts storage.

Messaging must work with the database slow or down (privacy.md 1): nothing
here is awaited on the per-message hot path.
"""
