-- jobstream schema, version 5: the host-load brake (docs/metrics.md#the-brake).
-- host_load: the latest telemetry per host (from telemetry.hosts, Telegraf's Kafka output).
CREATE TABLE host_load (
    host          text PRIMARY KEY,
    cpu_busy_pct  real,
    load_per_cpu  real,
    mem_used_pct  real,
    at            timestamptz NOT NULL
);

-- brake: admission's slot capacity target (NULL: no brake, the static capacity applies).
CREATE TABLE brake (
    name    text PRIMARY KEY,
    target  integer CHECK (target IS NULL OR target >= 0),
    static  integer NOT NULL DEFAULT 0,
    reason  text NOT NULL DEFAULT '',
    at      timestamptz NOT NULL DEFAULT now()
);
INSERT INTO brake (name, target) VALUES ('slots', NULL);
