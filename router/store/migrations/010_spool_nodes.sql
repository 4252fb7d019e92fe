-- Several routers may share one database (nodes behind a load balancer).
-- Each spool row names the node that accepted (or adopted) it, so a node
-- that restarts resends only its own rows, not what a running node holds.
-- A node is alive while it holds a session advisory lock on its id; a
-- row in router_nodes tells the others when it was last seen, so the rows
-- of a node that died (lock free and not seen for node_grace seconds) are
-- adopted by a live one. NULL: a row written before this migration.
ALTER TABLE spool ADD COLUMN node text;
CREATE TABLE router_nodes (
    node       text PRIMARY KEY,
    started_at timestamptz NOT NULL DEFAULT now(),
    seen_at    timestamptz NOT NULL DEFAULT now()
);
