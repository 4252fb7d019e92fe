-- sms-router schema, version 1.
-- Personal data lives only in traffic_log (source, destination, text) and
-- opt_out (msisdn); see the data map in README.md. Secret-class messages
-- never put those fields here.

CREATE TABLE accounts (
    id              bigserial PRIMARY KEY,
    name            text NOT NULL UNIQUE,
    system_id       text UNIQUE,
    password_hash   text,                   -- argon2id; NULL = no SMPP access
    default_class   text NOT NULL DEFAULT 'standard'
                    CHECK (default_class IN ('standard', 'secret')),
    max_binds       integer NOT NULL DEFAULT 10 CHECK (max_binds >= 0),
    allowed_ips     cidr[],                 -- NULL = any source address
    tps             double precision,       -- NULL = unlimited
    retention_days  integer NOT NULL DEFAULT 30 CHECK (retention_days > 0),
    purge_days      integer NOT NULL DEFAULT 395 CHECK (purge_days > 0),
    webhook_url     text,
    enabled         boolean NOT NULL DEFAULT true,
    created_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE api_keys (
    id              bigserial PRIMARY KEY,
    account_id      bigint NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    prefix          text NOT NULL,          -- first characters, for lookup
    key_hash        text NOT NULL,          -- argon2id of the whole key
    permissions     text[] NOT NULL DEFAULT '{send}',
    created_at      timestamptz NOT NULL DEFAULT now(),
    revoked_at      timestamptz
);
CREATE INDEX api_keys_prefix ON api_keys (prefix) WHERE revoked_at IS NULL;

-- The traffic log: one row per accepted message, written once by COPY.
-- Status changes go to delivery_events (append-only), never UPDATE here on
-- the hot path. Retention anonymises rows in place and drops partitions.
CREATE TABLE traffic_log (
    id              text NOT NULL,
    account_id      bigint NOT NULL,
    class           text NOT NULL,
    ingress         text NOT NULL,
    source          text,                   -- NULL for secret / anonymised
    destination     text,                   -- NULL for secret; truncated when anonymised
    country         text NOT NULL,
    carrier         text,
    parts           integer NOT NULL,
    data_coding     integer NOT NULL,
    body            text,                   -- NULL for secret / anonymised
    userref         text,
    accepted_at     timestamptz NOT NULL,
    anonymised_at   timestamptz
) PARTITION BY RANGE (accepted_at);
CREATE TABLE traffic_log_default PARTITION OF traffic_log DEFAULT;
CREATE INDEX traffic_log_account_time ON traffic_log (account_id, accepted_at);
CREATE INDEX traffic_log_id ON traffic_log (id);

CREATE TABLE delivery_events (
    message_id      text NOT NULL,
    account_id      bigint NOT NULL,
    status          text NOT NULL,
    carrier         text,
    error           text,
    at              timestamptz NOT NULL
) PARTITION BY RANGE (at);
CREATE TABLE delivery_events_default PARTITION OF delivery_events DEFAULT;
CREATE INDEX delivery_events_message ON delivery_events (message_id);

-- Append-only: who did what. Never holds a number in clear (keyed hash).
CREATE TABLE audit_log (
    id              bigserial PRIMARY KEY,
    at              timestamptz NOT NULL DEFAULT now(),
    actor           text NOT NULL,
    action          text NOT NULL,
    account_id      bigint,
    detail          jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX audit_log_at ON audit_log (at);

CREATE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' THEN
        RAISE EXCEPTION 'audit_log is append-only';
    END IF;
    IF OLD.at > now() - interval '2 years' THEN
        RAISE EXCEPTION 'audit_log rows are kept for 2 years';
    END IF;
    RETURN OLD;
END $$;
CREATE TRIGGER audit_log_guard BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_append_only();

CREATE TABLE opt_out (
    account_id      bigint NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    msisdn          text NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account_id, msisdn)
);
