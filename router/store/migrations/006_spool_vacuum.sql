-- Every accepted message is inserted into the spool and deleted moments
-- later: the table is all churn. Vacuum it early and without throttling so
-- dead rows do not pile up and slow the group commits (seen as PostgreSQL
-- CPU growing during a benchmark run).
ALTER TABLE spool SET (
    autovacuum_vacuum_scale_factor = 0.0,
    autovacuum_vacuum_threshold = 10000,
    autovacuum_vacuum_cost_delay = 0,
    autovacuum_analyze_scale_factor = 0.05
);
ALTER TABLE receipt_routes SET (
    autovacuum_vacuum_scale_factor = 0.01,
    autovacuum_vacuum_cost_delay = 0
);
