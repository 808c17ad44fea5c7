"""Alembic's entry point for the session store: `SessionStore` runs the migrations on its own
connection (no alembic.ini, no URL here)."""

from alembic import context

context.configure(connection=context.config.attributes["connection"])
with context.begin_transaction():
    context.run_migrations()
