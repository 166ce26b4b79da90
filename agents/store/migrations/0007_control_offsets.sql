-- jobstream schema, version 7: job commands (cancel, retry) from jobs.control are applied
-- exactly once: the transaction that applies them records the next offset to apply, so a
-- batch replayed after a scheduler kill or a rebalance changes nothing.
CREATE TABLE control_offsets (
    topic       text NOT NULL,
    partition   integer NOT NULL,
    next_offset bigint NOT NULL,
    PRIMARY KEY (topic, partition)
);
