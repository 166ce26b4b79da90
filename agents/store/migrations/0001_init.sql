-- jobstream schema, version 1: jobs, their dependencies, lifecycle history, dead letters, workers.

CREATE TABLE jobs (
    id              text PRIMARY KEY,
    tenant          text NOT NULL,
    kind            text NOT NULL,
    group_key       text,
    args            jsonb NOT NULL DEFAULT '{}'::jsonb,
    priority        smallint NOT NULL DEFAULT 0 CHECK (priority BETWEEN -20 AND 20),
    size            bigint NOT NULL DEFAULT 0 CHECK (size >= 0),
    depends_on      text[] NOT NULL DEFAULT '{}',
    labels          text[] NOT NULL DEFAULT '{}',
    resources       text[] NOT NULL DEFAULT '{}',
    timeout_s       double precision,
    max_attempts    integer NOT NULL DEFAULT 3 CHECK (max_attempts >= 1),
    state           text NOT NULL CHECK (state IN ('waiting', 'ready', 'dispatched', 'running',
                                                   'succeeded', 'failed', 'cancelled')),
    gate            text,
    attempt         integer NOT NULL DEFAULT 0,
    dispatch_confirmed boolean NOT NULL DEFAULT false,
    worker          text,
    exit_code       integer,
    error           text,
    log_path        text,
    submitted_at    timestamptz NOT NULL,
    accepted_at     timestamptz NOT NULL DEFAULT now(),
    ready_at        timestamptz,
    dispatched_at   timestamptz,
    started_at      timestamptz,
    finished_at     timestamptz,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    origin_topic    text,
    origin_partition integer,
    origin_offset   bigint
);

CREATE INDEX jobs_ready_idx ON jobs (ready_at) WHERE state = 'ready';
CREATE INDEX jobs_dispatched_idx ON jobs (dispatched_at) WHERE state IN ('dispatched', 'running');
CREATE INDEX jobs_tenant_state_idx ON jobs (tenant, state);
CREATE INDEX jobs_group_idx ON jobs (group_key) WHERE group_key IS NOT NULL;

-- One row per edge: job_id waits for dep_id. dep_id may name a job not yet submitted.
CREATE TABLE job_deps (
    job_id  text NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    dep_id  text NOT NULL,
    PRIMARY KEY (job_id, dep_id)
);
CREATE INDEX job_deps_dep_idx ON job_deps (dep_id);

-- Append-only history of applied lifecycle events (what `jobstream job ID` shows).
CREATE TABLE job_history (
    id       bigserial PRIMARY KEY,
    job_id   text NOT NULL,
    attempt  integer NOT NULL DEFAULT 0,
    event    text NOT NULL,
    at       timestamptz NOT NULL DEFAULT now(),
    detail   jsonb NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX job_history_job_idx ON job_history (job_id, id);

CREATE TABLE dead_letters (
    id         bigserial PRIMARY KEY,
    topic      text NOT NULL,
    partition  integer NOT NULL,
    "offset"   bigint NOT NULL,
    key        bytea,
    value      bytea,
    reason     text NOT NULL,
    at         timestamptz NOT NULL DEFAULT now(),
    replayed_at timestamptz,
    UNIQUE (topic, partition, "offset")
);

CREATE TABLE workers (
    id           text PRIMARY KEY,
    host         text NOT NULL,
    slots_total  integer NOT NULL,
    slots_free   integer NOT NULL,
    running      text[] NOT NULL DEFAULT '{}',
    state        text NOT NULL,
    first_seen   timestamptz NOT NULL DEFAULT now(),
    last_seen    timestamptz NOT NULL
);
