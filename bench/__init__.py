"""`make bench`: how fast imgq classifies, against the in-memory ceiling and the naive loop (see run.py)."""
