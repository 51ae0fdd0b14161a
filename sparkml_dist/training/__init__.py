"""What runs inside a rank: the one epoch/step loop, the training modes (data-parallel, feature-parallel),
models and optimizers, shard -> batch loading and its readers, device placement, checkpoints.
Rank side: nothing here imports pyspark.

Imports nothing: importing one module of the group never loads the others."""
