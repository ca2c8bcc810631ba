-- Two database roles. From here on migrations run as the owner role (DATABASE_OWNER_URL, or
-- `sensei-control-plane migrate`); the application connects as a role that is granted, on the
-- audit tables, only SELECT and INSERT on audit_log and SELECT on audit_checkpoints (the
-- grants are made after every migration, see db::grant_application). Everything the
-- application may not do itself goes through functions owned by the owner.

-- The link of each row names the audit key that signed it; NULL for rows written before the
-- chain was keyed (plain SHA-256 links).
ALTER TABLE audit_log ADD COLUMN key_id text;

-- The guards run with the owner's rights and a fixed search path, so that the application
-- role cannot shadow a function or operator they call.
ALTER FUNCTION audit_log_refuse_change() SECURITY DEFINER SET search_path = pg_catalog, public;
ALTER FUNCTION audit_checkpoint_check() SECURITY DEFINER SET search_path = pg_catalog, public;
ALTER FUNCTION audit_log_expire_only() SECURITY DEFINER SET search_path = pg_catalog, public;
ALTER FUNCTION audit_retention(uuid) SECURITY DEFINER SET search_path = pg_catalog, public;

-- Expiry: the only way the application removes audit rows. It writes the checkpoint and
-- deletes the rows it covers; the triggers above still decide whether that is allowed (the
-- rows must be past their retention), so the application cannot expire what is not due.
CREATE FUNCTION audit_expire_through(chain uuid, through bigint) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public AS $$
DECLARE
    last_row record;
    covered bigint;
BEGIN
    SELECT hash, at INTO last_row FROM audit_log WHERE chain_id = chain AND seq = through;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no audit row % in chain %', through, chain
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    SELECT count(*) INTO covered FROM audit_log WHERE chain_id = chain AND seq <= through;
    INSERT INTO audit_checkpoints (chain_id, through_seq, through_hash, through_at, rows_expired)
        VALUES (chain, through, last_row.hash, last_row.at, covered);
    DELETE FROM audit_log WHERE chain_id = chain AND seq <= through;
    RETURN covered;
END
$$;
REVOKE ALL ON FUNCTION audit_expire_through(uuid, bigint) FROM PUBLIC;
