-- How often each text answer was asked for, aggregated by the workers from the API replicas'
-- batches (never written on the request path).
CREATE TABLE popularity (
    key               text        PRIMARY KEY,
    a                 text        NOT NULL,
    b                 text        NOT NULL,
    requests          bigint      NOT NULL,
    last_requested_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX popularity_by_requests ON popularity (requests DESC);

-- Pre-warm batches and their matchups. A matchup is done when its text (and, when asked for,
-- its picture) is done; `copies` counts repeats within the batch so that totals add up.
CREATE TABLE prewarm_batches (
    id             text        PRIMARY KEY,
    total          integer     NOT NULL,
    already_cached integer     NOT NULL,
    images         boolean     NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE prewarm_items (
    batch_id     text    NOT NULL REFERENCES prewarm_batches (id) ON DELETE CASCADE,
    key          text    NOT NULL,
    copies       integer NOT NULL,
    text_status  text    NOT NULL CHECK (text_status IN ('pending', 'done', 'failed')),
    image_key    text,
    image_status text    CHECK (image_status IN ('pending', 'done', 'failed')),
    PRIMARY KEY (batch_id, key)
);
CREATE INDEX prewarm_items_text_pending ON prewarm_items (key) WHERE text_status = 'pending';
CREATE INDEX prewarm_items_image_pending ON prewarm_items (image_key)
    WHERE image_status = 'pending';
