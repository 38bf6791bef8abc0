"""Apply the Alembic migrations that ship inside the package (`billing db upgrade`)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine

MIGRATIONS_DIR = Path(__file__).parent / "migrations"


def alembic_config(engine: Engine) -> Config:
    """An Alembic config for our migrations that runs on `engine`."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option(
        "sqlalchemy.url", engine.url.render_as_string(hide_password=False).replace("%", "%%")
    )
    config.attributes["engine"] = engine
    return config


def upgrade(engine: Engine, revision: str = "head") -> list[str]:
    """Bring the schema up to `revision` (the newest by default); return the revisions applied,
    oldest first (none when it was up to date)."""
    config = alembic_config(engine)
    before = current_revision(engine)
    command.upgrade(config, revision)
    after = current_revision(engine)
    if after is None or after == before:
        return []
    applied = ScriptDirectory.from_config(config).iterate_revisions(after, before or "base")
    return [script.revision for script in reversed(list(applied))]


def current_revision(engine: Engine) -> str | None:
    """The schema's revision, None for a database never migrated."""
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def downgrade(engine: Engine, revision: str) -> None:
    """Take the schema back to `revision` (`base` drops every table)."""
    command.downgrade(alembic_config(engine), revision)
