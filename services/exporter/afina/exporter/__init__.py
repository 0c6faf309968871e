"""The exporter worker: merge a trained adapter, convert to GGUF, quantize, verify, register.

``pipeline.export_job`` is the whole stage, read top to bottom; ``tasks`` holds its Celery task.
"""
