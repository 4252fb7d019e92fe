-- Receipts across nodes sharing the database (router/ingress/handoff.py):
-- which node holds receiving binds of which account, and receipts waiting
-- for another node to send them. A row of receipt_handoff lives until that
-- node takes it (milliseconds) or its retention ends; it holds the encoded
-- deliver_sm (no message text; a secret message's addresses blanked).
CREATE TABLE receipt_binds (
    node       text NOT NULL,
    account_id bigint NOT NULL,
    binds      integer NOT NULL,
    PRIMARY KEY (node, account_id)
);
CREATE TABLE receipt_handoff (
    id         bigserial PRIMARY KEY,
    node       text NOT NULL,
    account_id bigint NOT NULL,
    pdu        bytea NOT NULL,
    expires_at timestamptz NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX receipt_handoff_node ON receipt_handoff (node, id);
