-- Carriers deliver a receipt over any bind of the system_id, so with
-- several nodes it often reaches one that did not submit the message.
-- receipt_routes names the node that did; a live owner is handed the
-- carrier's receipt (carrier_receipt_handoff, no personal data) and
-- finishes the message itself; a dead owner's receipts are finished by
-- whichever node gets them. NULL: a row written before this migration.
ALTER TABLE receipt_routes ADD COLUMN node text;
CREATE TABLE carrier_receipt_handoff (
    id         bigserial PRIMARY KEY,
    node       text NOT NULL,
    carrier    text NOT NULL,
    carrier_id text NOT NULL,
    state      integer NOT NULL,
    error      text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX carrier_receipt_handoff_node ON carrier_receipt_handoff (node, id);
