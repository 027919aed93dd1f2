-- Accounts: managed by `hub-worker accounts` (the owner role), read by the resolve
-- command to check `resolvedBy`.

-- name: account_exists
SELECT EXISTS (SELECT 1 FROM accounts WHERE id = :account_id);

-- name: upsert_account
-- Create an account, or rename an existing one when a name is given.
INSERT INTO accounts (id, name) VALUES (:account_id, :name)
ON CONFLICT (id) DO UPDATE SET name = coalesce(EXCLUDED.name, accounts.name), updated_at = now()
RETURNING id, name, created_at, (xmax = 0) AS created;

-- name: list_accounts
SELECT id, name, created_at FROM accounts ORDER BY id;
