"""Tunables of the worker, each with its unit. Settings that operators change live in config."""

# Inbound bodies above this are dead-lettered as too_large (contract section 3).
MAX_EVENT_BYTES = 64 * 1024

# Nesting levels a known value of an event (`details`, `metadata`) may have,
# counted from the value itself: well within what jsonb and the outbound
# serializer take (pydantic stops at 255 with the event around it). Deeper is
# invalid_event; unknown keys may nest as deep as 64 KiB allows.
MAX_KNOWN_VALUE_DEPTH = 64

# Inbound subjects whose route (worker.subjects.parse_inbound) is remembered,
# the least recently seen forgotten first: a drain sees the same few thousand
# (a session's lifecycle, its signal kinds) over and over. Only subjects of at
# most ROUTE_CACHE_LONGEST characters, which every subject of the contract is
# (ids of 128 and a kind of 64), so that it holds 2 MiB at most, whatever
# subjects arrive.
ROUTE_CACHE_SUBJECTS = 4096
ROUTE_CACHE_LONGEST = 512

# A dead letter's announcement carries at most this share of the server's
# max_payload of the original body (as base64, a third more, so two thirds of
# max_payload at most): with the rest of the event it fits whatever arrived.
# The stored row keeps all of it.
DEAD_LETTER_ANNOUNCED_SHARE = 0.5

# Deliveries (attempts) of one message that fail the same way before it is
# dead-lettered as handler_error (contract section 6).
HANDLER_ATTEMPTS = 5
# Backoff between those attempts: first delay and cap, seconds.
HANDLER_RETRY_BASE_SECONDS = 0.2
HANDLER_RETRY_MAX_SECONDS = 5.0

# How long a lane waits for a message before it looks again whether it is
# still its own (released, its database connection lost), seconds. A lane
# applies a batch (HUB_BATCH_MAX messages at most) well within ACK_WAIT_SECONDS.
FETCH_WAIT_SECONDS = 1.0
# A lane keeps pull requests open for the next 2 x HUB_BATCH_MAX messages, and
# at least this many (worker.bus.StandingPull): the next batch is in the client
# when a transaction ends, and a trickle waits for no request. What is buffered
# counts against the ack wait; a drain takes 2 x 500 messages in tens of ms.
PULL_AHEAD_MIN = 32
# Each pull request expires on the server after this long, seconds, and is
# renewed: a request lost without a word (a server restart the client did not
# see as a reconnect) costs at most this long.
PULL_EXPIRES_SECONDS = 5.0
# A request is taken for gone this long after it should have expired, when
# its 408 has not come, seconds.
PULL_EXPIRY_GRACE_SECONDS = 1.0
# Bytes one pull request may bring (at least twice the server's max_payload):
# with two requests open, a lane buffers ~16 MiB at most even when every
# message is as large as the server takes. The bench mix's 400 messages ahead
# are ~0.2 MiB.
PULL_MAX_BYTES = 8 * 1024 * 1024
# A lane waits at most this long for a turn of the batch transaction
# (HUB_LANE_TURNS, worker.lanes.Turnstile), then goes without one, seconds:
# a lane holding its turn for long (waiting out a locked database) holds up
# no other for more than this.
TURN_WAIT_SECONDS = 0.1
# A group of several lanes' batches (worker.groups) not committed after this long
# is cancelled and each lane applies its batch alone: a lane whose sessions are
# locked holds up the lanes that happened to share its transaction for no
# longer than this, seconds. Transactions of a group take milliseconds.
GROUP_ALONE_AFTER_SECONDS = 1.0
# Time the server waits for an ack before redelivering, seconds.
ACK_WAIT_SECONDS = 30.0
# Unacked messages one consumer may have out at once.
MAX_ACK_PENDING = 1000

# Lane ownership: how often a worker looks for lanes nobody owns, seconds.
LANE_CLAIM_INTERVAL_SECONDS = 1.0
# Member slots a worker may take to count live workers (advisory lock ids).
MEMBER_SLOTS = 256
# Lane owners' heartbeats (docs/decisions.md, "A hung owner"): each worker's lane
# manager beats this often from its control connection, seconds, independently of
# lane work; a peer that finds a beat older than LANE_OWNER_SILENT_SECONDS (by the
# database's clock) terminates that worker's lane connections and takes its lanes.
# A worker stopped with SIGSTOP keeps its connections and locks, so without this its
# lanes would wait until it resumes. Six missed beats: an event loop starved on a
# loaded machine is not taken for a hung one (a false positive only moves lanes:
# the lane lock still guarantees a single applier). A worker whose own loop was
# held up for more than half that bound does not judge others in that round.
LANE_OWNER_BEAT_SECONDS = 5.0
LANE_OWNER_SILENT_SECONDS = 30.0
# A lane this worker owns that has messages waiting and has not advanced (its
# consumer's ack floor did not move) for this long makes /readyz fail, seconds.
# As long as a statement may wait on a lock (DB_STATEMENT_TIMEOUT_SECONDS), so a
# short table lock (an index build, a VACUUM FULL of a small table) does not trip
# it; a batch redone one message at a time advances with every message settled.
# During a database outage the lane is lost (not owned) and the postgres check fails.
LANE_STUCK_AFTER_SECONDS = 60.0

# Outbox relay: rows per read, the polling fallback when no NOTIFY arrives,
# and how long a JetStream publish may wait for its ack, seconds.
RELAY_BATCH = 1000
# Most outbound events sent before their acks are awaited.
RELAY_WINDOW = 500
RELAY_POLL_SECONDS = 1.0
PUBLISH_ACK_TIMEOUT_SECONDS = 5.0
# After JetStream refused a window, the bound of the relay's first pause, seconds
# (doubling to RECONNECT_MAX_SECONDS, with full jitter).
RELAY_RETRY_BASE_SECONDS = 1.0
# How often a worker that is not the relay leader tries to become it, seconds.
LEADER_RETRY_SECONDS = 1.0

# Ledger retention runs this often, deleting at most this many rows per statement.
MAINTENANCE_INTERVAL_SECONDS = 300.0
PURGE_BATCH_ROWS = 10_000

# Reconnect backoff for PostgreSQL and NATS outages: first delay and cap, seconds.
RECONNECT_BASE_SECONDS = 0.2
RECONNECT_MAX_SECONDS = 5.0

# JetStream's duplicate window for Nats-Msg-Id on both streams, seconds.
DUPLICATE_WINDOW_SECONDS = 120.0

# Stall sweep: how often the sweep leader checks whether an interval is due
# (a quarter of HUB_SWEEP_INTERVAL_SECONDS, within these bounds), seconds; and
# the most sessions one sweep opens stalls for.
SWEEP_TICK_MIN_SECONDS = 0.1
SWEEP_TICK_MAX_SECONDS = 5.0
SWEEP_BATCH = 5_000

# Resolve command: database connections serving it per worker.
COMMAND_POOL_SIZE = 4

# Operations: how often consumer info and the outbox backlog are sampled for
# /metrics, and how old the last consumer answer may be before /readyz says
# not ready, seconds; the time /readyz gives PostgreSQL to answer, seconds.
METRICS_SAMPLE_SECONDS = 2.0
CONSUMER_STALE_SECONDS = 15.0
# /readyz says the relay is stuck when the oldest outbox row has stayed the same
# (nothing published or set aside) this long, seconds. A moving relay replaces it
# within a window's ack wait (PUBLISH_ACK_TIMEOUT_SECONDS).
RELAY_STALL_SECONDS = 30.0
# Outbox rows the backlog gauge counts exactly; past them it is an upper bound.
OUTBOX_BACKLOG_COUNTED = 10_000
READINESS_QUERY_SECONDS = 1.0
# Consecutive fetch failures after which a lane recreates its stream,
# consumer and subscription as needed.
REPAIR_AFTER_FAILURES = 5

# Bounds on a database round trip, on every connection but `migrate`'s (a migration
# may rightly take long). The server ends a statement, or a transaction left open
# by a stuck worker, after DB_STATEMENT_TIMEOUT_SECONDS; the client gives up on an
# answer a little later (a network partition sends no reset, and TCP alone would
# wait many minutes) and reconnects, as after any lost connection.
DB_STATEMENT_TIMEOUT_SECONDS = 60
DB_COMMAND_TIMEOUT_SECONDS = 75
# The server probes a silent worker connection after this idle time, then every
# interval, this many times: a worker host that vanished gives back its lanes (their
# advisory locks) in about a minute instead of the kernel's two hours.
DB_KEEPALIVE_IDLE_SECONDS = 30
DB_KEEPALIVE_INTERVAL_SECONDS = 10
DB_KEEPALIVE_COUNT = 3

# Catch-up progress (worker/progress.py): a worker whose lanes hold at least this
# many messages not yet applied logs its progress (backlog, events/s, time left)
# this often, seconds.
CATCH_UP_MIN_MESSAGES = 1000
CATCH_UP_LOG_SECONDS = 5.0

# The garbage collector of `hub-worker run`'s process (cli/run.py): a first-generation
# collection after this many more container objects allocated than freed (Python's
# default, 700, is passed within a single batch: a drain spent 12 % of the worker's
# CPU collecting, re-walking the batch's live objects, against under 1 % with
# 20,000). Garbage in cycles is rare here; up to this many objects of it wait for a
# collection.
GC_FIRST_GENERATION_OBJECTS = 20_000
