-- Reports (issue 29): what clients say about a stored answer. One report per client per
-- answer counts: the answer is its row's `attempt` (attempts never repeat for a key, across
-- purges too), so a purged and regenerated answer starts with no reports. `client` is a
-- pseudonym the API derives from the client's address (an IPv4 address or an IPv6 /48), never
-- the address itself.
CREATE TABLE reports (
    kind       text        NOT NULL CHECK (kind IN ('text', 'image')),
    key        text        NOT NULL,
    attempt    integer     NOT NULL,
    client     text        NOT NULL,
    reason     text        NOT NULL CHECK (reason IN ('unsafe', 'wrong', 'poor', 'other')),
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (kind, key, attempt, client),
    FOREIGN KEY (kind, key) REFERENCES generations (kind, key) ON DELETE CASCADE
);

-- A hidden answer is a `refused` row that keeps its text or picture (`hidden_at` says when
-- enough clients reported it unsafe), so that an operator's `keep` can bring it back; an
-- operator's `refuse` drops them. `kept_attempt` is the answer an operator chose to keep: no
-- report hides it again, while a regenerated one (a later attempt) can be.
ALTER TABLE generations ADD COLUMN hidden_at timestamptz, ADD COLUMN kept_attempt integer;

-- The workers record reports and settle them; the API's admin route lists them.
GRANT SELECT, INSERT ON reports TO versus_worker;
GRANT SELECT ON reports TO versus_api;
