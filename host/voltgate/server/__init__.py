"""The management server (DESIGN.md, Management server): registry, permits with
approval conditions, rentals, outlet sessions, energy ledger, value points and
fees, readings; storage in SQLite by default or PostgreSQL (VOLTGATE_DB).

Layers: `domain` (pure Python), `services` (use cases on a SQLAlchemy session),
`models` + `db` (storage), entrypoints (`api` for HTTP, `gateway` for the boards,
`voltgate` CLI commands).
"""
