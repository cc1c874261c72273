"""Delivery engines: what takes operations from the extension and makes the calls
(:mod:`.delivery` from a store, with threads of its own; :mod:`.sync` inline;
:mod:`.celery` through Celery workers). :mod:`.base` is the interface they share."""
