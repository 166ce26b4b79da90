-- jobstream schema, version 14: jobs that run at a given moment. ``run_at`` is what the
-- submission asked (its run_at, or delay_s after acceptance); ``run_after`` starts equal to
-- it, so admission gates the job ("scheduled") until then, holding nothing. A retry's
-- backoff replaces run_after; run_at stays as asked.
ALTER TABLE jobs ADD COLUMN run_at timestamptz;
