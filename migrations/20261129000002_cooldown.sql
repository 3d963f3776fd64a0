-- A matchup whose generations keep failing cools down before it is paid for again: after
-- VERSUS_COOLDOWN_AFTER_FAILURES failed generations in a row, no claim succeeds before
-- `retry_at`, and requests meanwhile get the last error (code and message, as clients saw it).
ALTER TABLE generations
    ADD COLUMN failures      integer NOT NULL DEFAULT 0,
    ADD COLUMN retry_at      timestamptz,
    ADD COLUMN error_code    text,
    ADD COLUMN error_message text;
