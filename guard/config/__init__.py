"""The SQL configuration store: models, sessions, validated writes and the snapshot loader."""
