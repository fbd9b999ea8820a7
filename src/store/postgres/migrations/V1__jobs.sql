-- The job records and their places in the queue: what the file store keeps as
-- jobs/<job_id>.json and queue.json.
--
-- body is the job exactly as its job file would hold it (json keeps the text as written, so
-- unknown fields come back unchanged); status repeats the body's for queries. placement and
-- rank are the queue: 'running' and 'queued' jobs ordered by rank (the worker's ranks, an
-- unsigned 64-bit number stored order-preserving as bigint: rank XOR 2^63), 'off' for a
-- finished job. version counts the writes of a record; every write names the version it
-- replaces, so a write based on a stale copy changes nothing.
CREATE TABLE tw_jobs (
    id uuid PRIMARY KEY,
    body json NOT NULL,
    status text NOT NULL,
    placement text NOT NULL CHECK (placement IN ('running', 'queued', 'off')),
    rank bigint,
    version bigint NOT NULL CHECK (version > 0),
    updated_at timestamptz NOT NULL DEFAULT now(),
    CHECK ((placement = 'off') = (rank IS NULL))
);

CREATE INDEX tw_jobs_queue ON tw_jobs (placement, rank) WHERE placement <> 'off';

-- Rows that could not be read at boot, set aside as the file store moves a damaged file to
-- quarantine/.
CREATE TABLE tw_quarantine (
    id bigserial PRIMARY KEY,
    job_id uuid,
    body text NOT NULL,
    reason text NOT NULL,
    quarantined_at timestamptz NOT NULL DEFAULT now()
);
