-- The durable spool: accepted messages not yet taken by a carrier.
-- A row lives from acceptance until the carrier's positive submit_sm_resp
-- (or a final failure); at-least-once delivery replays what is left after
-- a crash. Secret-class payloads are AES-GCM encrypted with a key that is
-- never stored in the database (ROUTER_SPOOL_KEY).
CREATE TABLE spool (
    id              text PRIMARY KEY,
    account_id      bigint NOT NULL,
    class           text NOT NULL,
    created_at      timestamptz NOT NULL,
    expires_at      timestamptz NOT NULL,
    encrypted       boolean NOT NULL,
    payload         bytea NOT NULL
);
CREATE INDEX spool_created ON spool (created_at);
