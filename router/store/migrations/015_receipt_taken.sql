-- A receipt a node takes from receipt_handoff (handed to it by another
-- node, or parked and its account now bound here) stays, marked taken,
-- until the customer has answered it, or it was given up, parked again or
-- handed on (router/ingress/handoff.py): a crash of the taking node in
-- between no longer loses it. Taken rows are taken again when their node
-- starts again under the same name, or is found dead and adopted.
-- Old routers, in a rolling upgrade, do not know the mark: they may send a
-- taken receipt a second time (at least once).
ALTER TABLE receipt_handoff ADD COLUMN taken boolean NOT NULL DEFAULT false;
-- Likewise a carrier's receipt handed to the node that sent its message
-- (carrier_receipt_handoff): deleted once that node has logged the status
-- it brings, so a crash of the node before does not lose it.
ALTER TABLE carrier_receipt_handoff ADD COLUMN taken boolean NOT NULL DEFAULT false;
-- Takes look for rows neither parked nor taken; taken rows of a customer
-- that answers slowly must not lengthen that walk.
CREATE INDEX receipt_handoff_untaken ON receipt_handoff (node, id) WHERE NOT parked AND NOT taken;
CREATE INDEX carrier_receipt_handoff_untaken ON carrier_receipt_handoff (node, id) WHERE NOT taken;
