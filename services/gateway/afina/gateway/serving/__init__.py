"""From a public model name to an answer: which models a name means (``resolve``), which backend runs
each (``backends``), how many calls a model takes at once (``limiter``), and trying the targets of a
route in order until one answers (``dispatch``). Both API surfaces (``/v1`` and ``/api``) go through it."""
