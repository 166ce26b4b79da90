-- jobstream schema, version 13: dispatches waiting for the broker, one row per admission
-- transaction instead of one confirmation update per job. Admission writes each job it
-- dispatches with the id of its send and inserts the send's row; once the broker has every
-- dispatch of the send, the row is deleted. A dispatch is unconfirmed while its job is
-- still dispatched with neither ``dispatch_confirmed`` (set by a recorded start, or by the
-- reconciler after a re-send) nor its send's row gone.
CREATE SEQUENCE dispatch_send_seq;
CREATE TABLE dispatch_sends (
    id bigint PRIMARY KEY,
    at timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE jobs ADD COLUMN dispatch_send bigint;
