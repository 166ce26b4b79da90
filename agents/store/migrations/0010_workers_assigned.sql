-- jobstream schema, version 10: the dispatch partitions a worker consumes (`topic[p]`), from
-- its heartbeat: a dispatch still in Kafka is owned by the live worker assigned its
-- partition; one that no live worker consumes past the liveness bound is handed back.
ALTER TABLE workers ADD COLUMN assigned text[] NOT NULL DEFAULT '{}';
