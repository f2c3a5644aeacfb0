"""Fresh models: incremental training over the days of a drifting stream.

``online.days=N`` (with ``data.days >= N``, trainer/data/drift.py) makes
``python -m trainer`` walk days ``0 .. N-1``: evaluate on day ``t`` with the
model trained so far (the next-day AUC), then train ``online.steps_per_day``
steps on it, checkpoint, export. ``trainer/online/days.py`` is the walk,
``stream.py`` its day-switching source, ``report.py`` ``days.jsonl``, the
per-day table and ``days.png``. ``publish.py`` publishes the serving bundle
atomically (``exports/v<k>/`` and ``LATEST``) from a forked writer
(``snapshot.py``); ``follow.py`` trains the partitions of a prepared dataset as
they arrive (``partition_stream.py``, ``online.follow=true``).

Example::

    python -m trainer experiment=online/drift          # 7 days, trained every day
    python -m trainer experiment=online/drift_frozen   # trained on day 0 only
"""
