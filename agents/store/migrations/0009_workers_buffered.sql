-- jobstream schema, version 9: the dispatches a worker holds buffered (job ids), from its
-- heartbeat: with `running`, who owns each dispatched job (the monitor, `why`, the
-- invariant "no job dispatched or running without a live owner").
ALTER TABLE workers ADD COLUMN buffered text[] NOT NULL DEFAULT '{}';
