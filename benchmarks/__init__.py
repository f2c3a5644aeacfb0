"""shardrec's benchmarks, as code: ``python -m benchmarks.bench`` (``make bench``).

- ``bench``: shardrec against plain PyTorch, torchrec's loop and the dense floor;
  it runs ``worker`` under torchrun, one job per shape; the contenders are in
  ``models`` (shapes, shardrec) and ``baselines`` (pytorch, torchrec, dense).
- ``op_profile``: shardrec's step against torchrec's, op by op (torchrun).
- ``gpu_bandwidth``: FBGEMM's fused embedding forward against a device copy (CUDA).
- ``prepare``: ``trainer.prepare`` against torchrec's TSV conversion.
- ``shard_input``: input cost of prepared shards against the synthetic source.
- ``checkpoint``: the loop's blocked time per save, sync against async.
- ``planted_to_tsv``: the synthetic clicks as Criteo TSV, with their oracle AUC.
- ``elastic_plot``: an elastic run's loss curve across a world-size change.
- ``studies.distill``, ``studies.int2``: the distillation and int2 sweeps' tables.

Results: ``benchmarks/RESULTS.md`` (CPU) and ``benchmarks/GPU.md``.
"""
