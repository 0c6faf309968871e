"""``/v1/fine_tuning/jobs/{id}/evaluations`` and ``/v1/models/{model}/evaluations``: evaluations on demand."""
