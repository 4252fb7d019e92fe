-- Privacy support: retention, data-subject requests, opt-out, audit.
-- No personal data is added anywhere by this file.

-- Retention anonymises rows not yet anonymised, oldest first: a partial
-- index keeps that search small (it holds only the last retention window).
CREATE INDEX traffic_log_not_anonymised ON traffic_log (accepted_at)
    WHERE anonymised_at IS NULL;

-- Data-subject export/erasure and the destination filter of GET /v1/traffic
-- look rows up by account and number.
CREATE INDEX traffic_log_account_destination ON traffic_log (account_id, destination);

-- TRUNCATE fires no row trigger, so the append-only guard of 001 needs a
-- statement-level twin: the audit log is never emptied wholesale.
CREATE FUNCTION audit_log_no_truncate() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only (TRUNCATE refused)';
END $$;
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION audit_log_no_truncate();

-- Every router node keeps the opt-out list in memory; a change made on one
-- node (or by the CLI) tells the others which account to reload. The
-- payload is the account id only, never the number.
CREATE FUNCTION opt_out_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('opt_out_changed',
                      COALESCE(NEW.account_id, OLD.account_id)::text);
    RETURN NULL;
END $$;
CREATE TRIGGER opt_out_notify AFTER INSERT OR DELETE ON opt_out
    FOR EACH ROW EXECUTE FUNCTION opt_out_notify();

-- Credentials are "revocable at once" (privacy.md 5): a change to accounts
-- or API keys, from any node or the CLI, tells every router to reload its
-- account store. No payload.
CREATE FUNCTION accounts_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('accounts_changed', '');
    RETURN NULL;
END $$;
CREATE TRIGGER accounts_notify AFTER INSERT OR UPDATE OR DELETE ON accounts
    FOR EACH STATEMENT EXECUTE FUNCTION accounts_notify();
CREATE TRIGGER api_keys_notify AFTER INSERT OR UPDATE OR DELETE ON api_keys
    FOR EACH STATEMENT EXECUTE FUNCTION accounts_notify();
