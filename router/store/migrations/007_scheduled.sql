-- Scheduled messages (send_at / schedule_delivery_time) wait in the spool:
-- due_at is their send time while they wait, NULL for every message that is
-- queued (or due and released). The partial index keeps the scheduler's
-- poll cheap and costs the hot path nothing (its rows are never indexed).
ALTER TABLE spool ADD COLUMN due_at timestamptz;
CREATE INDEX spool_due ON spool (due_at) WHERE due_at IS NOT NULL;
