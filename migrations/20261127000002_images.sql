-- Pictures: where the bytes are in our object store, and what they are. A provider URL is
-- never stored (they expire after an hour).
ALTER TABLE generations
    ADD COLUMN image_path   text,
    ADD COLUMN image_size   bigint,
    ADD COLUMN image_sha256 text,
    ADD COLUMN content_type text,
    ADD CONSTRAINT image_done_has_bytes
        CHECK (status <> 'done' OR kind <> 'image' OR image_path IS NOT NULL);
