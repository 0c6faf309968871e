"""``/v1/models``: the catalog's base models and the tenant's own fine-tunes."""
