"""Celery app, queue names and the leased-job runner shared by every worker."""
