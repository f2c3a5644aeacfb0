"""Study reports over Hydra sweeps: ``python -m benchmarks.studies.distill DIR``
(``+sweep=distill_study``) and ``python -m benchmarks.studies.int2 DIR`` (``+sweep=int2_study``)."""
