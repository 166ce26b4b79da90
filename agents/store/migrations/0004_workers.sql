-- jobstream schema, version 4: workers that run jobs for real.
-- run_after: a retried job waits out its backoff (admission gates it until then).
-- progress: what a running job last reported (0..1), carried by its worker's heartbeat.
ALTER TABLE jobs ADD COLUMN run_after timestamptz;
ALTER TABLE jobs ADD COLUMN progress real;

-- labels: what a worker carries (kinds with labels run only on workers that carry them all).
-- state: running | draining | stopped | lost (the monitor declared it lost after silence).
ALTER TABLE workers ADD COLUMN labels text[] NOT NULL DEFAULT '{}';
ALTER TABLE workers ADD COLUMN load real;
ALTER TABLE workers ADD COLUMN pid integer;
ALTER TABLE workers ADD COLUMN lost_at timestamptz;

CREATE INDEX jobs_running_worker_idx ON jobs (worker) WHERE state = 'running';
CREATE INDEX workers_live_idx ON workers (last_seen) WHERE state IN ('running', 'draining');
-- since: when the worker process started; a job started before it (same id, restarted
-- process) is an orphan the monitor retries.
ALTER TABLE workers ADD COLUMN since timestamptz;
