-- Matchups that moderation refused: the row keeps why (`error`), never the text, and no claim
-- succeeds on it again; an operator's purge deletes it like an answer.
ALTER TABLE generations DROP CONSTRAINT generations_status_check;
ALTER TABLE generations ADD CONSTRAINT generations_status_check
    CHECK (status IN ('running', 'done', 'failed', 'refused'));
