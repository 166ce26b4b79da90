-- jobstream schema, version 12: how far the heartbeats agent has recorded each partition of
-- workers.heartbeat (the next offset to record). A worker is declared lost only when its
-- partition is recorded up to the broker's end: while the agent is behind (its scheduler
-- was killed and the partition has not moved yet), silence in the table is not silence.
CREATE TABLE heartbeat_progress (
    partition   integer PRIMARY KEY,
    next_offset bigint NOT NULL,
    at          timestamptz NOT NULL DEFAULT now()
);
