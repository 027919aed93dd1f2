-- Operator commands: resolving a detection, managing accounts.

-- name: lock_detection
SELECT id, resolved_at FROM detections WHERE id = $1 FOR NO KEY UPDATE;

-- name: account_exists
SELECT EXISTS (SELECT 1 FROM accounts WHERE id = $1);

-- name: resolve_detection
UPDATE detections
SET resolved_at = now(), resolved_by = $2, resolution = $3, updated_at = now()
WHERE id = $1 AND resolved_at IS NULL
RETURNING id, session_id, anomaly_type, severity, details, dedup_key, occurrence_count,
          created_at, updated_at, resolved_at, resolved_by, resolution;

-- name: upsert_account
-- Create an account, or rename an existing one when a name is given.
INSERT INTO accounts (id, name) VALUES ($1, $2)
ON CONFLICT (id) DO UPDATE SET name = coalesce(EXCLUDED.name, accounts.name), updated_at = now()
RETURNING id, name, created_at, (xmax = 0) AS created;

-- name: list_accounts
SELECT id, name, created_at FROM accounts ORDER BY id;
