"""The database: engines and sessions, tables, migrations."""
