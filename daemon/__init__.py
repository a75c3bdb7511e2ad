"""The daemon: settings, store, ingestion, scheduling, service lifecycle and the CLI."""
