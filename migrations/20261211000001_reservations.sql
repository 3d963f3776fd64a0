-- The daily budget is reserved before each paid call, not hoped for (issue 27). A worker
-- reserves the worst case a call may cost (its kind and model, from VERSUS_PRICES) before it
-- makes the call; once the call ends, what it really cost replaces the reservation (spend.rs).
-- At no moment does a day's spend plus what is reserved exceed the budget, whatever the
-- number of workers: reservations are granted one at a time, under the day's row lock.

-- Each UTC day's spend, all kinds and pictures alone: what reservations are judged against.
-- `spend` keeps the detail per kind and model; both are written in one statement.
CREATE TABLE budget_days (
    day       date             PRIMARY KEY,
    usd       double precision NOT NULL DEFAULT 0,
    image_usd double precision NOT NULL DEFAULT 0
);

INSERT INTO budget_days (day, usd, image_usd)
SELECT day, sum(usd), COALESCE(sum(usd) FILTER (WHERE kind = 'image'), 0)
FROM spend
GROUP BY day;

-- What calls under way may still cost. A reservation that a worker never settled (it died
-- mid-call) stops counting when it expires: its call cannot still be running by then.
CREATE TABLE spend_reservations (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    day        date             NOT NULL,
    kind       text             NOT NULL CHECK (kind IN ('chat', 'image')),
    usd        double precision NOT NULL CHECK (usd >= 0),
    expires_at timestamptz      NOT NULL
);
CREATE INDEX spend_reservations_day ON spend_reservations (day, expires_at);

-- Grants the reservations asked for together, in order: each one while the day's spend, plus
-- what is reserved and unexpired, plus it stays within `total_cap`, and a picture's also within
-- `image_cap` for pictures alone. Returns each reservation's id, or NULL for one refused.
CREATE FUNCTION reserve_spend(
    p_day date,
    p_kinds text[],
    p_usd double precision[],
    p_total_cap double precision,
    p_image_cap double precision,
    p_ttl interval
) RETURNS bigint[]
LANGUAGE plpgsql AS $$
DECLARE
    spent double precision;
    image_spent double precision;
    held double precision;
    image_held double precision;
    ids bigint[] := '{}';
    id bigint;
BEGIN
    INSERT INTO budget_days (day) VALUES (p_day) ON CONFLICT (day) DO NOTHING;
    -- The lock that makes grants one at a time, cluster-wide, until this transaction ends.
    SELECT b.usd, b.image_usd INTO spent, image_spent
    FROM budget_days b WHERE b.day = p_day FOR UPDATE;
    SELECT COALESCE(sum(r.usd), 0), COALESCE(sum(r.usd) FILTER (WHERE r.kind = 'image'), 0)
    INTO held, image_held
    FROM spend_reservations r WHERE r.day = p_day AND r.expires_at > now();
    FOR i IN 1 .. COALESCE(array_length(p_kinds, 1), 0) LOOP
        IF spent + held + p_usd[i] <= p_total_cap
           AND (p_kinds[i] <> 'image' OR image_spent + image_held + p_usd[i] <= p_image_cap) THEN
            INSERT INTO spend_reservations (day, kind, usd, expires_at)
            VALUES (p_day, p_kinds[i], p_usd[i], now() + p_ttl)
            RETURNING spend_reservations.id INTO id;
            held := held + p_usd[i];
            IF p_kinds[i] = 'image' THEN
                image_held := image_held + p_usd[i];
            END IF;
            ids := ids || id;
        ELSE
            ids := ids || NULL::bigint;
        END IF;
    END LOOP;
    -- Expired reservations are gone for good: nothing settles them any more.
    DELETE FROM spend_reservations r WHERE r.day = p_day AND r.expires_at <= now();
    RETURN ids;
END $$;

GRANT SELECT, INSERT, UPDATE ON budget_days TO versus_worker;
GRANT SELECT, INSERT, DELETE ON spend_reservations TO versus_worker;
GRANT SELECT ON budget_days, spend_reservations TO versus_api;
GRANT EXECUTE ON FUNCTION reserve_spend(date, text[], double precision[], double precision,
    double precision, interval) TO versus_worker;
REVOKE EXECUTE ON FUNCTION reserve_spend(date, text[], double precision[], double precision,
    double precision, interval) FROM PUBLIC;
