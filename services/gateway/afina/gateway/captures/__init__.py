"""Capture for retraining: a route's kept exchanges, their feedback, their JSONL, and the job that retrains on them."""
