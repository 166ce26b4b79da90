-- jobstream schema, version 8: what a job holds belongs to one attempt. A cancelled attempt
-- keeps its holds until its end is reported (or it cannot be running any more), so a retry
-- admitted meanwhile holds its own and no resource is over-committed by a process that is
-- still stopping.
ALTER TABLE job_holds ADD COLUMN attempt integer NOT NULL DEFAULT 0;
ALTER TABLE job_holds DROP CONSTRAINT job_holds_pkey;
ALTER TABLE job_holds ADD PRIMARY KEY (job_id, attempt, name);
