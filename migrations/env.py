"""Alembic environment of Guard's configuration store.

There is no ``alembic.ini``: ``guard.config.db`` builds the configuration in code and hands over
an open connection inside its transaction, so that a migration commits or rolls back as a whole
and the store URL (with its password) never passes through Alembic.
"""

from __future__ import annotations

from alembic import context

from guard.config.models import Base
from guard.errors import ConfigurationError

connection = context.config.attributes.get("connection")
if connection is None or context.is_offline_mode():
    raise ConfigurationError(
        "run Guard migrations through guard.config.db.upgrade()/downgrade() (guard db upgrade)"
    )

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=True,
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
