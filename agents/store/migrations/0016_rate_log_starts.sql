-- jobstream schema, version 16: rate limits held at the start of jobs. Each window-log entry
-- names the attempt it admitted and, once known, when that attempt started (the worker's
-- clock, epoch seconds); ``seq`` is the admission order. An entry without a start is
-- resolved when its attempt is no longer dispatched or running (it ended unstarted).
-- Entries from before this version count as started when admitted.
ALTER TABLE rate_log
    ADD COLUMN seq bigserial,
    ADD COLUMN job_id text,
    ADD COLUMN attempt integer,
    ADD COLUMN started_at double precision;
UPDATE rate_log SET started_at = at;
-- the latest entries of a key, in admission order
CREATE INDEX rate_log_key_seq_idx ON rate_log (key, seq);
-- the starts of a key within a window
CREATE INDEX rate_log_key_start_idx ON rate_log (key, started_at);
-- entries whose start is not known: by key (is an older one unresolved?) and by attempt
-- (a start reported)
CREATE INDEX rate_log_unstarted_key_idx ON rate_log (key, seq) WHERE started_at IS NULL;
CREATE INDEX rate_log_unstarted_attempt_idx ON rate_log (job_id, attempt)
    WHERE started_at IS NULL;
-- the instant a dispatched attempt may start (a rate limit held at the start): the dispatch
-- carries it, a re-sent dispatch too, and ``why`` shows it
ALTER TABLE jobs ADD COLUMN not_before double precision;
