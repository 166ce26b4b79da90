-- jobstream schema, version 11: when an attempt took what it holds. The holds of an attempt
-- that never started and that a later attempt followed (a dispatch handed back while it
-- could still reach a worker) are given back by age, not when the job last changed: a job
-- offered again and again would otherwise keep every old attempt's holds.
ALTER TABLE job_holds ADD COLUMN since timestamptz NOT NULL DEFAULT now();
