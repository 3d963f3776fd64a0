-- An operator's purge keeps the row, as `purged`, rather than deleting it (issue 25): no text,
-- no picture, no error, no lease, no cool-down, but its names and its `attempt`. A purged row
-- counts as no answer (nothing reads it as one) and is claimed like a failed one, at
-- `attempt + 1`: the attempt names an answer in the events' and SSE ids (`<attempt>:<offset>`),
-- and must never name two answers of one key, or a client resuming after a purge would splice
-- them. A purged row's `completed_at` is when its purge finished (NULL while one is under way,
-- or failed half-way and is to be asked again). The workers may update rows already
-- (20261207000001_roles.sql): no grant changes.
ALTER TABLE generations DROP CONSTRAINT generations_status_check;
ALTER TABLE generations ADD CONSTRAINT generations_status_check
    CHECK (status IN ('running', 'done', 'failed', 'refused', 'purged'));
