"""Making the model cheaper: precision, QAT, distillation, quantized export.

Converters here take a model built on the meta device and return it converted,
before sharding (see DESIGN.md). None ship yet; the trainer composes whatever
this package provides in one documented order.
"""
