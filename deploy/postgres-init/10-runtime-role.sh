#!/bin/sh
# Runs once, when the postgres image initialises its volume: creates the role that
# `hub-worker run` logs in as. It owns nothing; `hub-worker migrate` (as the owner,
# POSTGRES_USER) grants it the rows it needs (sql/grants.sql) through
# HUB_DATABASE_RUNTIME_ROLE. On a volume made before this script existed, create
# the role by hand the same way.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    --set role="$RUNTIME_DB_USER" --set password="$RUNTIME_DB_PASSWORD" <<'SQL'
CREATE ROLE :"role" LOGIN PASSWORD :'password';
SQL
