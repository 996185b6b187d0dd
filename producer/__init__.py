"""The producer side: reading URL lists, submitting jobs, waiting, exporting results, and the `imgq` CLI."""
