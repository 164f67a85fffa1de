"""The parts of ``libstore.Library`` by area (one mixin class per module); import ``Library`` from
``libstore``. Each method is a thin call of one operation, as in ``libstore/library.py``."""
