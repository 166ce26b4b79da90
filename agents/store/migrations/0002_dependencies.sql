-- Dependencies, version 2: trigger rules, per-edge requirements, strict per-key order,
-- workflows and root causes.

ALTER TABLE jobs
    ADD COLUMN trigger text NOT NULL DEFAULT 'all_success'
        CHECK (trigger IN ('all_success', 'all_done')),
    ADD COLUMN order_key text,
    ADD COLUMN workflow_id text,
    ADD COLUMN root_cause text,
    ADD COLUMN seq bigint GENERATED ALWAYS AS IDENTITY;

CREATE INDEX jobs_order_key_idx ON jobs (tenant, order_key, seq DESC) WHERE order_key IS NOT NULL;
CREATE INDEX jobs_workflow_idx ON jobs (workflow_id) WHERE workflow_id IS NOT NULL;
CREATE INDEX jobs_waiting_idx ON jobs (accepted_at) WHERE state = 'waiting';

-- 'success': the dependency must succeed; 'done': it must merely end (all_done, order_key).
ALTER TABLE job_deps
    ADD COLUMN needs text NOT NULL DEFAULT 'success' CHECK (needs IN ('success', 'done')),
    ADD COLUMN kind text NOT NULL DEFAULT 'depends_on' CHECK (kind IN ('depends_on', 'order'));
