-- Aliases: names an operator declared to be another name (`Kakarot` is `Goku`). Requests
-- naming an alias (by its match key) are answered under the canonical name's key. The
-- workers write this table and, after it, the answers bucket's `alias.<hash>` entries, which
-- every process follows. Aliases never chain: no `canonical_match` is an `alias_match`.
CREATE TABLE aliases (
    -- The alias's match key (what requests are compared by), and the alias as written.
    alias_match text PRIMARY KEY,
    alias text NOT NULL,
    -- The canonical name as written (the display name answers get), and its match key.
    canonical text NOT NULL,
    canonical_match text NOT NULL CHECK (canonical_match <> alias_match),
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- The chain check: is the alias to be added some alias's canonical name?
CREATE INDEX aliases_canonical_match ON aliases (canonical_match);

-- The workers change aliases; the API's admin route lists them.
GRANT SELECT, INSERT, UPDATE, DELETE ON aliases TO versus_worker;
GRANT SELECT ON aliases TO versus_api;
