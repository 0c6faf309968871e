"""``/v1/routes``: aliases with A/B splits, fallbacks and defaults, managed by the tenant's operators."""
