-- Applying a batch of inbound events (worker.effects): a few statements load
-- and lock what the batch can touch, worker.batch decides in memory, a few
-- set-based statements write the result. All in the caller's transaction.
-- Keys are written in sorted order so that concurrent workers lock shared rows
-- (spokes, workspaces, tasks, parent sessions) in the same order. The set-based
-- writes take one array per column, each named after the column it becomes.

-- name: batch_start
-- The batch's first statement: the transaction's clock (every "now" of the batch),
-- which of its eventIds the ledger has already, and its sessions, locked, each
-- with its mapping (the m_ columns, null when it has none). The first row (`head`)
-- carries the clock and the ledger's answer; one row per session follows.
-- Sessions seen for the first time are created (with the spoke of their first
-- event, which owns them, and that spoke) before anything is decided, so that every
-- event of a session, new or not, serialises on the session's row: a created row is
-- this transaction's until it commits; an existing one is locked here. NO KEY
-- UPDATE: it does not block the key-share locks that foreign keys take, so a
-- mapping naming this session as its parent does not wait. The created rows come
-- from the INSERT's RETURNING (the statement's snapshot does not see them); a
-- session another transaction created after that snapshot is in neither, and the
-- caller runs this again, which then finds and locks it (worker.db.load_snapshot).
WITH new_session AS (
    SELECT s.id, s.spoke_id
    FROM unnest(:id::text[], :spoke_id::text[]) AS s (id, spoke_id)
    WHERE NOT EXISTS (SELECT 1 FROM sessions WHERE sessions.id = s.id)
), new_spoke AS (
    INSERT INTO spokes (id)
    SELECT DISTINCT spoke_id FROM new_session ORDER BY spoke_id
    ON CONFLICT (id) DO NOTHING
), created AS (
    INSERT INTO sessions (id, spoke_id)
    SELECT id, spoke_id FROM new_session ORDER BY id
    ON CONFLICT (id) DO NOTHING
    RETURNING id, spoke_id, status, last_activity_at, ended_at, archived_at, metadata
), locked AS (
    SELECT s.id, s.spoke_id, s.status, s.last_activity_at, s.ended_at, s.archived_at,
           s.metadata,
           m.id AS m_id, m.spoke_id AS m_spoke_id, m.workspace_id AS m_workspace_id,
           m.parent_session_id AS m_parent_session_id, m.task_id AS m_task_id,
           m.task AS m_task, m.status AS m_status, m.metadata AS m_metadata,
           m.created_at AS m_created_at, m.updated_at AS m_updated_at
    FROM sessions AS s LEFT JOIN mappings AS m ON m.session_id = s.id
    WHERE s.id = ANY(:id::text[])
    ORDER BY s.id
    FOR NO KEY UPDATE OF s
)
SELECT true AS head, now() AS now,
       ARRAY(SELECT event_id FROM processed_events WHERE event_id = ANY(:event_ids::uuid[]))
           AS applied,
       NULL::text AS id, NULL::text AS spoke_id, NULL::text AS status,
       NULL::timestamptz AS last_activity_at, NULL::timestamptz AS ended_at,
       NULL::timestamptz AS archived_at, NULL::jsonb AS metadata,
       NULL::text AS m_id, NULL::text AS m_spoke_id, NULL::text AS m_workspace_id,
       NULL::text AS m_parent_session_id, NULL::text AS m_task_id, NULL::text AS m_task,
       NULL::text AS m_status, NULL::jsonb AS m_metadata, NULL::timestamptz AS m_created_at,
       NULL::timestamptz AS m_updated_at
UNION ALL
SELECT false, NULL, NULL, * FROM locked
UNION ALL
SELECT false, NULL, NULL, c.*, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL
FROM created AS c;

-- name: batch_detections
-- The active detections the batch can touch (worker.batch.Reach), locked (after
-- their sessions, by batch_start): those of the signals' dedup keys, the stalls of
-- the sessions with a lifecycle event, and everything of the archived sessions.
-- Not every active detection of the batch's sessions: a session keeps one per
-- anomaly type and fingerprint, more the longer it lives, and a row lock is written
-- to the row's page. They are found among the sessions' active detections, on
-- idx_detections_active_by_session: a probe of the unique index by key, planned
-- while the tables were empty, was a walk of that index instead, for every key.
-- Per dedup key also the detection resolved last: what late news counts on.
-- `active` tells the two apart; the other columns are DetectionRow's, in its order.
-- The resolved ones are one index probe per key (LIMIT 1 in
-- idx_detections_resolved_by_key's order), so that no plan, with statistics or
-- without, reads more than a row per key.
WITH active AS (
    SELECT id, session_id, anomaly_type, severity, details, dedup_key, occurrence_count,
           created_at, updated_at, resolved_at, resolved_by, resolution
    FROM detections
    WHERE session_id = ANY(:session_ids::text[]) AND resolved_at IS NULL
      AND (dedup_key = ANY(:dedup_key::text[])
           OR (anomaly_type = :stall_type::text AND session_id = ANY(:stalls_of::text[]))
           OR session_id = ANY(:all_of::text[]))
    ORDER BY id
    FOR NO KEY UPDATE
)
SELECT true AS active, * FROM active
UNION ALL
SELECT false, d.id, d.session_id, d.anomaly_type, d.severity, d.details, d.dedup_key,
       d.occurrence_count, d.created_at, d.updated_at, d.resolved_at, d.resolved_by,
       d.resolution
FROM unnest(:dedup_key::text[]) AS k (dedup_key)
CROSS JOIN LATERAL (
    SELECT * FROM detections
    WHERE detections.dedup_key = k.dedup_key AND resolved_at IS NOT NULL
    ORDER BY resolved_at DESC, created_at DESC
    LIMIT 1
) AS d;

-- name: write_batch
-- What the batch decided, in one statement: the ledger, the rows its events name
-- (spokes, workspaces, tasks, parent sessions), sessions, mappings, changed and
-- new detections, and the outbox. Each part is a data-modifying CTE; they share
-- one snapshot and touch disjoint rows (the parents are not among the batch's own
-- sessions), and the foreign keys are checked when the statement ends, so the order
-- between them does not matter.
-- `recorded` below the batch's eventIds means another transaction applied one of
-- them meanwhile: the caller rolls all of it back and redoes the batch one by one.
WITH recorded AS (
    INSERT INTO processed_events (event_id)
    SELECT unnest(:ledger::uuid[])
    ON CONFLICT (event_id) DO NOTHING
    RETURNING 1
), spoke AS (
    INSERT INTO spokes (id)
    SELECT spoke_id FROM unnest(:spoke_id::text[]) AS t (spoke_id) ORDER BY spoke_id
    ON CONFLICT (id) DO NOTHING
), workspace AS (
    INSERT INTO workspaces (id)
    SELECT workspace_id FROM unnest(:workspace_id::text[]) AS t (workspace_id) ORDER BY workspace_id
    ON CONFLICT (id) DO NOTHING
), task AS (
    INSERT INTO tasks (id)
    SELECT task_id FROM unnest(:task_id::text[]) AS t (task_id) ORDER BY task_id
    ON CONFLICT (id) DO NOTHING
), parent AS (
    -- A coordinator's session the hub has not heard from gets a row with no spoke.
    INSERT INTO sessions (id)
    SELECT parent_id FROM unnest(:parent_id::text[]) AS t (parent_id) ORDER BY parent_id
    ON CONFLICT (id) DO NOTHING
), session AS (
    -- Sessions as the batch left them. A conflict on a new one means another lane
    -- just created it as someone's parent (no spoke yet): this lane's state wins.
    INSERT INTO sessions (id, spoke_id, status, last_activity_at, ended_at, archived_at,
                          metadata)
    SELECT id, spoke_id, status, last_activity_at, ended_at, archived_at, metadata::jsonb
    FROM unnest(:s_id::text[], :s_spoke_id::text[], :s_status::text[],
                :s_last_activity_at::timestamptz[], :s_ended_at::timestamptz[],
                :s_archived_at::timestamptz[], :s_metadata::text[])
         AS s (id, spoke_id, status, last_activity_at, ended_at, archived_at, metadata)
    ORDER BY id
    ON CONFLICT (id) DO UPDATE SET
        spoke_id = EXCLUDED.spoke_id,
        status = EXCLUDED.status,
        last_activity_at = EXCLUDED.last_activity_at,
        ended_at = EXCLUDED.ended_at,
        archived_at = EXCLUDED.archived_at,
        metadata = EXCLUDED.metadata,
        updated_at = now()
), mapping AS (
    INSERT INTO mappings (id, session_id, spoke_id, workspace_id, parent_session_id, task_id,
                          task, status, metadata, created_at, updated_at)
    SELECT id, session_id, spoke_id, workspace_id, parent_session_id, task_id, task, status,
           metadata::jsonb, created_at, updated_at
    FROM unnest(:m_id::text[], :m_session_id::text[], :m_spoke_id::text[],
                :m_workspace_id::text[], :m_parent_session_id::text[], :m_task_id::text[],
                :m_task::text[], :m_status::text[], :m_metadata::text[],
                :m_created_at::timestamptz[], :m_updated_at::timestamptz[])
         AS m (id, session_id, spoke_id, workspace_id, parent_session_id, task_id, task, status,
               metadata, created_at, updated_at)
    ORDER BY session_id
    ON CONFLICT (session_id) DO UPDATE SET
        status = EXCLUDED.status,
        updated_at = EXCLUDED.updated_at
), detection AS (
    -- Existing detections as the batch left them; a detection resolved here frees
    -- its key for a new one (new_detection says how that is written).
    UPDATE detections AS d SET
        severity = c.severity,
        details = c.details::jsonb,
        occurrence_count = c.occurrence_count,
        updated_at = c.updated_at,
        resolved_at = c.resolved_at,
        resolved_by = c.resolved_by,
        resolution = c.resolution
    FROM unnest(:d_id::text[], :d_severity::text[], :d_details::text[],
                :d_occurrence_count::int[], :d_updated_at::timestamptz[],
                :d_resolved_at::timestamptz[], :d_resolved_by::text[], :d_resolution::text[])
         AS c (id, severity, details, occurrence_count, updated_at, resolved_at, resolved_by,
               resolution)
    WHERE d.id = c.id
), outbound AS (
    INSERT INTO outbox (event_id, subject, payload, aggregate)
    SELECT event_id, subject, payload, aggregate
    FROM unnest(:o_event_id::uuid[], :o_subject::text[], :o_payload::bytea[],
                :o_aggregate::text[])
         WITH ORDINALITY AS pending (event_id, subject, payload, aggregate, position)
    ORDER BY position
), new_detection AS (
    -- New detections, but for those that take a key the batch frees (a detection
    -- it resolves): each part of this statement sees the tables as the statement
    -- found them, so to an INSERT here such a key still looks taken; those go in a
    -- second run of this statement, with nothing else to write
    -- (worker.db.split_reopened). The session row lock already keeps other
    -- transactions off these keys; the partial unique index is the guard of last
    -- resort: should an active detection for a key have appeared meanwhile, its
    -- row is merged into rather than duplicated, and `merged` tells the caller to
    -- redo the batch.
    INSERT INTO detections (id, session_id, anomaly_type, severity, details, dedup_key,
                            occurrence_count, created_at, updated_at, resolved_at, resolved_by,
                            resolution)
    SELECT id, session_id, anomaly_type, severity, details::jsonb, dedup_key, occurrence_count,
           created_at, updated_at, resolved_at, resolved_by, resolution
    FROM unnest(:n_id::text[], :n_session_id::text[], :n_anomaly_type::text[],
                :n_severity::text[], :n_details::text[], :n_dedup_key::text[],
                :n_occurrence_count::int[], :n_created_at::timestamptz[],
                :n_updated_at::timestamptz[], :n_resolved_at::timestamptz[],
                :n_resolved_by::text[], :n_resolution::text[])
         AS n (id, session_id, anomaly_type, severity, details, dedup_key, occurrence_count,
               created_at, updated_at, resolved_at, resolved_by, resolution)
    ORDER BY resolved_at NULLS LAST
    ON CONFLICT (dedup_key) WHERE resolved_at IS NULL DO UPDATE SET
        occurrence_count = detections.occurrence_count + EXCLUDED.occurrence_count,
        updated_at = EXCLUDED.updated_at
    RETURNING (xmax <> 0) AS merged
), notified AS (
    -- The relay leader listens; PostgreSQL delivers this at commit (migration 0009).
    SELECT pg_notify('hub_worker_outbox', '') WHERE cardinality(:o_event_id::uuid[]) > 0
)
SELECT (SELECT count(*) FROM recorded) AS recorded,
       (SELECT count(*) FROM new_detection WHERE merged) AS merged,
       (SELECT count(*) FROM notified) AS notified;
