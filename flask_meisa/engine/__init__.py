"""Delivery engines: what takes operations from the extension and makes the calls.

- :mod:`.base`: the :class:`~.base.Dispatcher` and :class:`~.base.DeliveryHooks` protocols;
- :mod:`.thread`: :class:`~.thread.ThreadDispatcher`, worker threads in this process;
- :mod:`.sync`: every operation delivered inline;
- :mod:`.core`, :mod:`.scheduler`, :mod:`.ratelimit`, :mod:`.lifecycle`,
  :mod:`.reporting`: the thread engine's parts.
"""
