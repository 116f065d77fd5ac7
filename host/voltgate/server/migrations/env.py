"""Alembic environment of the server's schema (voltgate.server.models).

Run through voltgate.server.db.upgrade(url), which builds the Alembic
Config in code (no alembic.ini): the connection to migrate comes in
config.attributes["connection"], or the URL in the "sqlalchemy.url" option.
SQLite gets batch mode (ALTER TABLE through a copy of the table), so later
revisions can change columns there too.
"""

from alembic import context

from voltgate.server import db, models

config = context.config
target_metadata = models.Base.metadata


def _configure(connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )


def run_migrations_offline() -> None:
    url = db.url_from_env(config.get_main_option("sqlalchemy.url"))
    context.configure(url=url, target_metadata=target_metadata, literal_binds=True, render_as_batch=url.startswith("sqlite"))
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    conn = config.attributes.get("connection")
    if conn is not None:
        _configure(conn)
        with context.begin_transaction():
            context.run_migrations()
        return
    eng = db.engine(config.get_main_option("sqlalchemy.url"))
    try:
        with eng.connect() as conn:
            _configure(conn)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        eng.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
