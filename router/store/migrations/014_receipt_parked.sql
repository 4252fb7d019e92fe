-- Receipts for an SMPP customer with no receiving bind anywhere wait in the
-- database, not in memory (router/ingress/handoff.py, ReceiptHandoff.park):
-- a crash or a restart no longer loses them. A parked row belongs to its
-- node (adopted with the node's backlog if it dies) and is taken only when
-- the account binds: on that node (unpark) or on another (the row is handed
-- there). Old routers, in a rolling upgrade, take parked rows like any
-- other: into memory, as before.
ALTER TABLE receipt_handoff ADD COLUMN parked boolean NOT NULL DEFAULT false;
CREATE INDEX receipt_handoff_parked ON receipt_handoff (node, account_id) WHERE parked;
