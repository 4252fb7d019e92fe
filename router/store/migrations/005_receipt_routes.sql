-- Carrier message id -> our message, so that a receipt arriving after a
-- restart still finds its way to the submitter. Written in the same
-- transaction that deletes the spool row (the carrier has taken the
-- segment), deleted when that segment's final receipt is handled.
-- `info` holds what the receipt to the customer needs; it is NULL for
-- secret messages (their receipts then carry no addresses).
CREATE TABLE receipt_routes (
    carrier             text NOT NULL,
    carrier_id          text NOT NULL,      -- normalised: lower case, no leading zeros
    message_id          text NOT NULL,
    part                integer NOT NULL,
    parts               integer NOT NULL,
    account_id          bigint NOT NULL,
    account             text NOT NULL,
    origin              text NOT NULL,
    class               text NOT NULL,
    country             text NOT NULL,
    registered_delivery integer NOT NULL,
    accepted_at         timestamptz NOT NULL,
    info                jsonb,
    created_at          timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (carrier, carrier_id)
);
CREATE INDEX receipt_routes_message ON receipt_routes (message_id);
CREATE INDEX receipt_routes_created ON receipt_routes (created_at);
