-- Several daemons (nodes) on one database.
--
-- A running job belongs to the node that claimed it: owner names the node, lease_until is
-- when the claim lapses unless the owner renews it (the database's clock, now() + the
-- lease), and generation counts the claims of the job, one more at each. A write by the
-- owner is accepted only while its lease holds, so a node that lost its lease never changes
-- the job again; once a lease has lapsed any node may take the job over.
ALTER TABLE tw_jobs
    ADD COLUMN owner text,
    ADD COLUMN lease_until timestamptz,
    ADD COLUMN generation bigint NOT NULL DEFAULT 0;

CREATE INDEX tw_jobs_owner ON tw_jobs (owner) WHERE owner IS NOT NULL;
CREATE INDEX tw_jobs_changed ON tw_jobs (updated_at);

-- The nodes: each row is written by its node's heartbeat. A node is live while it holds
-- the advisory lock of its id (a session lock, so it goes with the node's connection).
CREATE TABLE tw_nodes (
    id text PRIMARY KEY,
    address text NOT NULL,
    pid integer NOT NULL,
    started_at timestamptz NOT NULL,
    heartbeat_at timestamptz NOT NULL,
    lease_ms bigint NOT NULL,
    gpus integer[] NOT NULL DEFAULT '{}',
    free_gpus integer[] NOT NULL DEFAULT '{}',
    running integer NOT NULL DEFAULT 0
);
