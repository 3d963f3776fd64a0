-- Degraded answers (issue 31): an answer a fallback provider made while the primary could
-- not. Its row names the fallback's model and says until when it is served
-- (`degraded_until`); past that, a job may claim the row again. `upgrade_queued_at` is when a
-- worker published the job that makes it again with the primary (at most
-- VERSUS_UPGRADE_PER_MINUTE a minute, cluster-wide): from then on, a job may claim it.
ALTER TABLE generations
    ADD COLUMN degraded_until timestamptz,
    ADD COLUMN upgrade_queued_at timestamptz;

-- The upgrade's look-up: the degraded answers not queued yet.
CREATE INDEX generations_degraded ON generations (degraded_until)
    WHERE degraded_until IS NOT NULL;
