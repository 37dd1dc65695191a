"""The PostgreSQL store: several kairoi-trio instances share one database.

    schema.py   the numbered migrations and the start-up version check
    rows.py     Job and Rule <-> table rows (pure)
    view.py     the State-like view one batch of the command actor works on (pure)
    store.py    PostgresStore: begin/append (one transaction per batch), claims,
                leases, LISTEN/NOTIFY, housekeeping

docs/postgres.md describes the design; nothing outside this package knows
which store runs (core/actor.py's `Log` is the seam).
"""
