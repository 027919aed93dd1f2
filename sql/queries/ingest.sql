-- Effects of one inbound event (contract section 4). Every query takes the
-- connection of the caller, who owns the transaction.

-- name: claim_event
-- Record an eventId in the once-only ledger; no row back means it was applied before.
INSERT INTO processed_events (event_id) VALUES ($1)
ON CONFLICT (event_id) DO NOTHING
RETURNING event_id;

-- name: ensure_spoke
INSERT INTO spokes (id) VALUES ($1) ON CONFLICT (id) DO NOTHING;

-- name: ensure_session
-- A session belongs to the spoke that reported it first.
INSERT INTO sessions (id, spoke_id) VALUES ($1, $2) ON CONFLICT (id) DO NOTHING;

-- name: lock_session
-- Every change to a session and its mapping and detections serialises on this row lock.
SELECT spoke_id, status, archived_at FROM sessions WHERE id = $1 FOR UPDATE;

-- name: claim_session
-- A session first seen as someone's parent has no spoke yet: its own first event claims it.
UPDATE sessions SET spoke_id = $2, updated_at = now() WHERE id = $1 AND spoke_id IS NULL;

-- name: record_activity
-- last_activity_at only moves forward, and a spoke clock running ahead of
-- ours counts as now, so that it cannot postpone a stall.
UPDATE sessions
SET last_activity_at = greatest(last_activity_at, least($2::timestamptz, now())),
    metadata = coalesce($3::jsonb, metadata),
    updated_at = now()
WHERE id = $1;

-- name: end_session
-- active -> completed | failed | aborted, never from a terminal status.
UPDATE sessions
SET status = $2, ended_at = least($3::timestamptz, now()), updated_at = now()
WHERE id = $1 AND status = 'active'
RETURNING id;

-- name: archive_session
UPDATE sessions
SET archived_at = least($2::timestamptz, now()),
    status = CASE WHEN status = 'active' THEN 'aborted' ELSE status END,
    ended_at = coalesce(ended_at, least($2::timestamptz, now())),
    updated_at = now()
WHERE id = $1;

-- name: ensure_workspace
INSERT INTO workspaces (id) VALUES ($1) ON CONFLICT (id) DO NOTHING;

-- name: ensure_task
INSERT INTO tasks (id) VALUES ($1) ON CONFLICT (id) DO NOTHING;

-- name: ensure_parent_session
-- The coordinator's session may be unknown to the hub; it gets a row with no spoke.
INSERT INTO sessions (id) VALUES ($1) ON CONFLICT (id) DO NOTHING;

-- name: insert_mapping
-- One mapping per session: a second spawned returns nothing.
INSERT INTO mappings (id, session_id, spoke_id, workspace_id, parent_session_id,
                      task_id, task, status, metadata)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
ON CONFLICT (session_id) DO NOTHING
RETURNING id, session_id, spoke_id, workspace_id, parent_session_id, task_id, task,
          status, created_at, updated_at;

-- name: end_mapping
UPDATE mappings SET status = $2, updated_at = now()
WHERE session_id = $1 AND status = 'active'
RETURNING id, session_id, spoke_id, workspace_id, parent_session_id, task_id, task,
          status, created_at, updated_at;
