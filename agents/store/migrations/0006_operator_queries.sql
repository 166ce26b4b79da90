-- jobstream schema, version 6: indexes for operators' questions (agents/queries.py), so
-- `status`, `jobs` and the status page answer in milliseconds with millions of jobs.
CREATE INDEX jobs_active_idx ON jobs (tenant, kind, state)
    WHERE state IN ('waiting', 'ready', 'dispatched', 'running');
CREATE INDEX jobs_finished_at_idx ON jobs (finished_at) WHERE finished_at IS NOT NULL;
CREATE INDEX jobs_accepted_idx ON jobs (accepted_at DESC, id DESC);
CREATE INDEX jobs_tenant_accepted_idx ON jobs (tenant, accepted_at DESC, id DESC);
CREATE INDEX jobs_state_accepted_idx ON jobs (state, accepted_at DESC, id DESC);
CREATE INDEX dead_letters_at_idx ON dead_letters (at);
