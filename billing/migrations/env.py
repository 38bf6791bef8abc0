"""Alembic environment: runs the project's migrations on the engine it is handed."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Engine

from billing.db import make_engine
from billing.migrations import env_metadata, include_object

target_metadata = env_metadata()


def run_migrations_online() -> None:
    config = context.config
    engine: Engine | None = config.attributes.get("engine")
    if engine is None:
        engine = make_engine(config.get_main_option("sqlalchemy.url") or "")
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=connection.dialect.name == "sqlite",
            compare_type=True,
            include_object=include_object(connection.dialect.name),
        )
        with context.begin_transaction():
            context.run_migrations()
        connection.commit()


run_migrations_online()
