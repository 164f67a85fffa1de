"""Alembic migrations of the libstore catalog (packaged as ``libstore.migrations``)."""
