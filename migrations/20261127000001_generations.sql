-- One row per (kind, key): who generates what, and the finished answer.
--
-- A worker claims a row with a single INSERT ... ON CONFLICT DO UPDATE ... WHERE that succeeds
-- only when the row is new, failed, or its lease has expired, and bumps `attempt`. Every later
-- write is fenced on that attempt, so a worker that lost its lease cannot overwrite the winner.
CREATE TABLE generations (
    kind              text        NOT NULL CHECK (kind IN ('text', 'image')),
    key               text        NOT NULL,
    -- Display names of the first request, kept for the prompt and the UI.
    a                 text        NOT NULL,
    b                 text        NOT NULL,
    model             text        NOT NULL,
    prompt_version    integer     NOT NULL,
    status            text        NOT NULL CHECK (status IN ('running', 'done', 'failed')),
    attempt           integer     NOT NULL DEFAULT 1,
    lease_until       timestamptz,
    worker            text,
    -- Text answers.
    text              text,
    prompt_tokens     integer,
    completion_tokens integer,
    -- Why the last attempt failed (never a secret; shown to operators).
    error             text,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    completed_at      timestamptz,
    PRIMARY KEY (kind, key),
    CHECK (status <> 'done' OR kind <> 'text' OR text IS NOT NULL)
);
