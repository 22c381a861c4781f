"""The hub's tables: one SQLAlchemy MetaData for SQLite and PostgreSQL (revisions: :mod:`cloud_hub.data.revisions`).

Times are epoch seconds as doubles, like the contract's window ``start``/``end``. Feature vectors are
stored as float32 little-endian bytes (:func:`cloud_hub.data.sessions.pack_features`), never as pickles.
"""

from __future__ import annotations

import sqlalchemy as sa

MODEL_STATES = ("candidate", "publishable", "rejected", "published")
ONLINE, OFFLINE = "online", "offline"

metadata = sa.MetaData()

devices = sa.Table(
    "devices", metadata,
    sa.Column("device_id", sa.String(64), primary_key=True),
    sa.Column("first_seen", sa.Double, nullable=False),
    sa.Column("last_seen", sa.Double, nullable=False),  # hub clock: last message of any kind
    sa.Column("state", sa.String(16), nullable=False, server_default=ONLINE),
    sa.Column("model_name", sa.String(64)),
    sa.Column("model_version", sa.BigInteger),
    sa.Column("model_sha256", sa.String(64)),
    sa.Column("outbox_depth", sa.BigInteger),
    sa.Column("last_error", sa.Text),
    sa.Column("status_ts", sa.Double),  # device clock of the last status message
    sa.Column("drift_psi", sa.Double),  # its last status's (edge_agent/drift.py)
    sa.Column("mean_confidence", sa.Double),
)

results = sa.Table(
    "results", metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("device_id", sa.String(64), nullable=False),
    sa.Column("seq", sa.BigInteger, nullable=False),
    sa.Column("start", sa.Double, nullable=False),
    sa.Column("end", sa.Double, nullable=False),
    sa.Column("model_version", sa.BigInteger, nullable=False),
    sa.Column("label", sa.String(256)),
    sa.Column("confidence", sa.Double),
    sa.Column("value", sa.Text),  # JSON list (regression output) or NULL
    sa.Column("truth", sa.String(256)),
    sa.Column("latency_ms", sa.Double, nullable=False),
    sa.Column("features", sa.LargeBinary),  # float32 little-endian, see pack_features
    sa.Column("received_at", sa.Double, nullable=False),
    sa.UniqueConstraint("device_id", "seq", name="uq_results_device_seq"),
    sa.Index("ix_results_start", "start"),
)

dead_letters = sa.Table(
    "dead_letters", metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("topic", sa.Text, nullable=False),
    sa.Column("payload", sa.LargeBinary, nullable=False),  # the first dead_letter_max_bytes bytes
    sa.Column("size", sa.BigInteger, nullable=False),  # the full payload size
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("received_at", sa.Double, nullable=False),
)

models = sa.Table(
    "models", metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(64), nullable=False),
    sa.Column("version", sa.BigInteger, nullable=False),
    sa.Column("created", sa.Double, nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("manifest", sa.Text, nullable=False),  # JSON
    sa.Column("bundle", sa.LargeBinary),  # the encoded contract Bundle (manifest + INT8 ONNX)
    sa.Column("weights", sa.LargeBinary),  # FP32 weights as arrays and their FP32 ONNX graph (cloud_hub.models.weights)
    sa.Column("metrics", sa.Text),  # JSON
    sa.Column("state", sa.String(16), nullable=False, server_default="candidate"),
    sa.Column("published_at", sa.Double),
    sa.UniqueConstraint("name", "version", name="uq_models_name_version"),
    sa.CheckConstraint("state IN ('candidate', 'publishable', 'rejected', 'published')", name="ck_models_state"),
)

ROLLOUT_STATES = ("canary", "promoted", "rolled_back")

rollouts = sa.Table(  # a version sent to a cohort of devices first (cloud_hub/rollout/canary.py)
    "rollouts", metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("model_name", sa.String(64), nullable=False),
    sa.Column("version", sa.BigInteger, nullable=False),
    sa.Column("previous_version", sa.BigInteger),  # on the model topic when the canary started
    sa.Column("cohort", sa.Text, nullable=False),  # JSON list of device ids
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("min_results", sa.BigInteger, nullable=False),
    sa.Column("tolerance", sa.Double, nullable=False),
    sa.Column("started_at", sa.Double, nullable=False),
    sa.Column("ended_at", sa.Double),
    sa.Column("reason", sa.Text),  # why it was promoted or rolled back
    sa.CheckConstraint("state IN ('canary', 'promoted', 'rolled_back')", name="ck_rollouts_state"),
)

events = sa.Table(  # what the hub did to the fleet's models, also published on {prefix}/events
    "events", metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("ts", sa.Double, nullable=False),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("model_name", sa.String(64)),
    sa.Column("version", sa.BigInteger),
    sa.Column("detail", sa.Text, nullable=False),  # JSON
)


ROUND_STATES = ("open", "closed", "published", "rejected", "failed")

fl_rounds = sa.Table(  # a federated round (cloud_hub/rounds/coordinator.py): its plan, its announcement and what came of it
    "fl_rounds", metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("model_name", sa.String(64), nullable=False),
    sa.Column("base_version", sa.BigInteger, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("participants", sa.Text, nullable=False),  # JSON list of the selected device ids
    sa.Column("plan", sa.Text, nullable=False),  # JSON: the announcement's header
    sa.Column("announcement", sa.LargeBinary, nullable=False),  # the signed payload, re-published on resume
    sa.Column("opened_at", sa.Double, nullable=False),
    sa.Column("deadline", sa.Double, nullable=False),
    sa.Column("closed_at", sa.Double),
    sa.Column("new_version", sa.BigInteger),  # the aggregated model, registered (published or rejected)
    sa.Column("outcome", sa.Text),  # JSON: accuracy before/after, bytes, ...
    sa.Column("reason", sa.Text),
    sa.CheckConstraint("state IN ('open', 'closed', 'published', 'rejected', 'failed')", name="ck_fl_rounds_state"),
    sa.Index("ix_fl_rounds_model_state", "model_name", "state"),
)

fl_updates = sa.Table(  # every update a device sent, with the hub's verdict
    "fl_updates", metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("round_id", sa.BigInteger, nullable=False),  # the round it counted in (or was refused by)
    sa.Column("update_round", sa.BigInteger),  # the round the device answered (older when late)
    sa.Column("device_id", sa.String(64), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("reason", sa.Text),
    sa.Column("n_examples", sa.BigInteger),
    sa.Column("staleness", sa.BigInteger),
    sa.Column("bytes", sa.BigInteger, nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False),  # of the payload: a redelivery is recognised
    sa.Column("metrics", sa.Text),  # JSON: loss and metric before/after, norm, epochs, seconds
    sa.Column("payload", sa.LargeBinary),  # the update as received, kept for accepted and late ones
    sa.Column("received_at", sa.Double, nullable=False),
    sa.CheckConstraint("status IN ('accepted', 'late', 'refused', 'evaluated', 'advert', 'shares', 'masked', 'revealed')",
                       name="ck_fl_updates_status"),  # the last four: a secure round's messages
    sa.Index("ix_fl_updates_round_device", "round_id", "device_id"),
    sa.Index("ix_fl_updates_sha256", "sha256"),  # a redelivery is looked up by it
)
