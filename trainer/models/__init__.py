"""Models: DLRM and DLRM-DCNv2 (torchrec's), DeepFM and Wide&Deep (ctr.py).

Example::

    model = build_model(arch="dlrm", tables=tables, num_dense=13,
                        dense_arch_layer_sizes=[64, 16], over_arch_layer_sizes=[64, 32, 1],
                        device=torch.device("meta"))
    loss, (loss_detached, logits, labels) = model(batch)
"""

from trainer.models.dlrm import build_model, embedding_bag_configs

__all__ = ["build_model", "embedding_bag_configs"]
