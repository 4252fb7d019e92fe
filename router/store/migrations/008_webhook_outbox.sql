-- The webhook outbox (issue #4): delivery webhooks of standard messages
-- still to be sent, so that a restart or a crash does not lose them.
-- A row is written (in batches, off the hot path) only for a webhook not
-- delivered within the writer's interval, updated after each failed
-- attempt and deleted on success or when given up (max attempts / 24 h).
-- next_at is both the retry time and the claim: a node takes due rows with
-- FOR UPDATE SKIP LOCKED and moves next_at to now() + its lease.
-- body is the exact JSON POSTed (the signature is recomputed over it with a
-- fresh timestamp); it holds the recipient's number, copied to destination
-- (digits, no '+') for data-subject export and erasure. Secret messages are
-- never written here (they stay in memory; privacy.md 2).
CREATE TABLE webhook_outbox (
    id              uuid PRIMARY KEY,
    account_id      bigint NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    message_id      text NOT NULL,
    url             text NOT NULL,
    destination     text NOT NULL,
    body            bytea NOT NULL,
    attempts        integer NOT NULL DEFAULT 0,
    next_at         timestamptz NOT NULL,
    created_at      timestamptz NOT NULL
);
-- The "due" poll: WHERE next_at <= now() ORDER BY next_at LIMIT n.
CREATE INDEX webhook_outbox_due ON webhook_outbox (next_at);

-- Rows come and go with every failing customer endpoint: vacuum early and
-- unthrottled, as for the spool (006).
ALTER TABLE webhook_outbox SET (
    autovacuum_vacuum_scale_factor = 0.0,
    autovacuum_vacuum_threshold = 1000,
    autovacuum_vacuum_cost_delay = 0,
    autovacuum_analyze_scale_factor = 0.05
);
