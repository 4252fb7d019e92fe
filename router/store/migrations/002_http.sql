-- sms-router schema, version 2: the HTTP front door.
--
-- idempotency_keys: the answer given to a POST /v1/messages that carried an
-- Idempotency-Key, so that a retry (on any node) gets the same answer instead
-- of sending twice. Kept 24 hours, then purged. Holds no personal data: the
-- body is message ids, part counts and encodings only; request_hash is a
-- SHA-256 over (account, key, canonical request), never the request itself.
-- status 0 marks a claim in progress (a node is handling the first request).

CREATE TABLE idempotency_keys (
    account_id      bigint NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    key             text NOT NULL,
    request_hash    text NOT NULL,
    status          integer NOT NULL,
    body            jsonb,
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account_id, key)
);
CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at);
