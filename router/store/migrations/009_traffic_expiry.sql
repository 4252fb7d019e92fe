-- When a message's validity ends, so GET /v1/messages/{id} and query_sm can
-- answer from the traffic log after the router has forgotten the message
-- (restart, or beyond its in-memory cache). NULL for rows written before.
ALTER TABLE traffic_log ADD COLUMN expires_at timestamptz;
