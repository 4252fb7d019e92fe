-- A message whose carrier receipt never comes is finished as 'unknown'
-- once its validity has ended plus delivery.receipt_timeout: expect_by is
-- that moment, written with the route (router/carriers/deadline.py claims
-- overdue rows through its index). Rows written before this migration, and
-- rows written by a router of an older version during a rolling upgrade,
-- get the default validity (48 h) plus one hour.
ALTER TABLE receipt_routes ADD COLUMN expect_by timestamptz;
UPDATE receipt_routes SET expect_by = created_at + interval '49 hours';
ALTER TABLE receipt_routes ALTER COLUMN expect_by SET DEFAULT now() + interval '49 hours';
ALTER TABLE receipt_routes ALTER COLUMN expect_by SET NOT NULL;
CREATE INDEX receipt_routes_expect_by ON receipt_routes (expect_by);
