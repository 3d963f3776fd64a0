-- A role per program, each allowed only the statements it runs (issue 24). The owner (whoever
-- runs the migrations) keeps everything; the programs connect as these:
--
-- - versus_api, the internet-facing API: its admin routes record pre-warm batches and read
--   their progress, the popularity, the spend and the names of a stored answer. It may not
--   change or delete a generation (a worker carries out an operator's purge).
-- - versus_worker: claims, leases, completions and failures of generations, purges (it deletes
--   generations), pre-warm items settled, popularity and spend added up. It may not change
--   the schema, so a worker connected as it runs no migration: the owner does
--   (`versus-worker --migrate-only` with the owner's DATABASE_URL).
--
-- Both log in, with no password until an operator sets one (`ALTER ROLE versus_api PASSWORD
-- '…'`): a role without one cannot log in where Postgres asks for a password.
--
-- Roles belong to the whole cluster, not to this database, and several databases of one
-- cluster may run this migration at once (the tests do): a role made meanwhile by another one
-- is no error. A role that is already there (made by an operator, say) is left as it is, so
-- that an owner without CREATEROLE can still migrate.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'versus_api') THEN
        CREATE ROLE versus_api LOGIN;
    END IF;
EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
END $$;

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'versus_worker') THEN
        CREATE ROLE versus_worker LOGIN;
    END IF;
EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
END $$;

-- On Postgres before 15 everyone may create tables in the schema public: not these roles.
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
GRANT USAGE ON SCHEMA public TO versus_api, versus_worker;

-- The API's admin routes (api/src/admin.rs). No table has a sequence.
GRANT SELECT ON generations TO versus_api;
GRANT SELECT, INSERT ON prewarm_batches, prewarm_items TO versus_api;
GRANT SELECT ON popularity, spend TO versus_api;

-- The workers (worker/src/claims.rs, purge.rs, popularity.rs, spend.rs). An upsert reads the
-- row it updates, hence SELECT with INSERT and UPDATE.
GRANT SELECT, INSERT, UPDATE, DELETE ON generations TO versus_worker;
GRANT SELECT, UPDATE ON prewarm_items TO versus_worker;
GRANT SELECT, INSERT, UPDATE ON popularity, spend TO versus_worker;
-- What a worker reads at start-up to see that every migration it embeds is applied
-- (shared/src/db.rs); the table is sqlx's, made before the first migration ran.
GRANT SELECT ON _sqlx_migrations TO versus_worker;
