-- What the upstream cost, per UTC day, kind of call and model: the truth behind the daily
-- budget (VERSUS_DAILY_BUDGET_USD). Workers add to it after every paid call and put the day's
-- total in the `versus_spend` KV bucket, which every process watches.
CREATE TABLE spend (
    day           date             NOT NULL,
    kind          text             NOT NULL CHECK (kind IN ('chat', 'image')),
    model         text             NOT NULL,
    usd           double precision NOT NULL,
    calls         bigint           NOT NULL,
    input_tokens  bigint           NOT NULL,
    output_tokens bigint           NOT NULL,
    images        bigint           NOT NULL,
    -- Calls that reported no usage (a stream cut mid-way): their tokens are estimated.
    estimated     bigint           NOT NULL,
    PRIMARY KEY (day, kind, model)
);
