-- Admission control, version 3: semaphores and what each job holds, the durable
-- sliding-window log, operator controls (pauses, run-time limits), explainable gates.

ALTER TABLE jobs
    ADD COLUMN exclusive text,
    ADD COLUMN gate_until double precision;

-- Capacity and usage of every semaphore: 'slots' (live worker capacity, from heartbeats),
-- 'kind:<kind>' (per-kind maximum), named resources, and '*' (the global scope).
CREATE TABLE semaphores (
    name      text PRIMARY KEY,
    capacity  integer NOT NULL CHECK (capacity >= 0),
    used      integer NOT NULL DEFAULT 0 CHECK (used >= 0)
);

-- What an admitted job holds until its attempt ends (deleted exactly once on release).
CREATE TABLE job_holds (
    job_id  text NOT NULL,
    name    text NOT NULL,
    amount  integer NOT NULL CHECK (amount > 0),
    PRIMARY KEY (job_id, name)
);

-- Admission times per rate-limit key (epoch seconds, as the admission core compares them).
CREATE TABLE rate_log (
    key  text NOT NULL,
    at   double precision NOT NULL
);
CREATE INDEX rate_log_key_at_idx ON rate_log (key, at);

-- Pauses (scope 'tenant' | 'kind' | 'job') and run-time rate limits, set through jobs.control.
CREATE TABLE pauses (
    scope   text NOT NULL,
    name    text NOT NULL,
    reason  text NOT NULL DEFAULT '',
    by_whom text NOT NULL DEFAULT '',
    at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (scope, name)
);

CREATE TABLE rate_limits (
    scope     text NOT NULL CHECK (scope IN ('tenant', 'kind', 'tenant_kind', 'global')),
    match     text NOT NULL,
    "limit"   integer NOT NULL CHECK ("limit" >= 1),
    window_s  double precision NOT NULL CHECK (window_s > 0),
    at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (scope, match)
);
