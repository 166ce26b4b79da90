-- jobstream schema, version 15: periodic schedules. One row a schedule: its expression, zone,
-- the job each tick submits (``job``: tenant, kind, args, priority) and its policies, and the
-- latest tick handled (``last_tick``, epoch seconds: ticks at or before it are done). A
-- scheduler's pass locks the rows (FOR UPDATE SKIP LOCKED), submits the due ticks' jobs
-- (ids ``schedule:NAME:<tick>``, so a repeated pass submits nothing twice) and moves
-- ``last_tick`` on. ``origin``: declared in the settings file or added at run time.
CREATE TABLE schedules (
    name text PRIMARY KEY,
    cron text NOT NULL,
    tz text NOT NULL DEFAULT 'UTC',
    job jsonb NOT NULL,
    catch_up text NOT NULL DEFAULT 'latest' CHECK (catch_up IN ('all', 'latest', 'none')),
    overlap text NOT NULL DEFAULT 'allow' CHECK (overlap IN ('skip', 'allow')),
    grace_s float8 NOT NULL DEFAULT 60 CHECK (grace_s > 0),
    paused boolean NOT NULL DEFAULT false,
    origin text NOT NULL DEFAULT 'command' CHECK (origin IN ('settings', 'command')),
    last_tick float8 NOT NULL,
    last_job text,
    submitted bigint NOT NULL DEFAULT 0,
    skipped bigint NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
