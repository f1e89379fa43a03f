"""Alembic environment: runs migrations on the connection the caller hands over, or on the
database outbox.config resolves."""
from alembic import context
from sqlalchemy import create_engine, pool

from outbox import db, schema

target_metadata = schema.metadata


def run_migrations_online() -> None:
    connection = context.config.attributes.get("connection")
    if connection is not None:
        context.configure(connection=connection, target_metadata=target_metadata)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = create_engine(db.sqlalchemy_url(context.config.get_main_option("sqlalchemy.url")),
                           poolclass=pool.NullPool)
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=target_metadata)
        with context.begin_transaction():
            context.run_migrations()


run_migrations_online()
