-- Matchups nobody asked for again are pruned by the workers (worker/src/popularity.rs:
-- `VERSUS_POPULARITY_RETENTION_DAYS`): they may delete popularity rows, found by their age.
GRANT DELETE ON popularity TO versus_worker;
CREATE INDEX popularity_by_last_requested ON popularity (last_requested_at);
