"""The parameter-server topology (``comm.strategy=parameter_server``): server shards hold the model and apply
the optimizer; workers (ordinary, non-barrier Spark tasks) pull parameters, compute gradients on their
sample shard and push them, at a pace of ``ssp`` (bounded staleness; 0 = bulk-synchronous) or ``async``.

- ``server``: one shard process (a contiguous slice of the flat parameter vector), ZeroMQ ROUTER socket.
- ``client``: the worker's side of the wire (one DEALER socket per shard, every wait with a timeout).
- ``worker``: the loop a worker task runs (rank side: never imports pyspark).
- ``driver``: starts the shards, runs one Spark job per worker (a lost worker is resubmitted alone while the
  others go on), evaluates each epoch's snapshot and tracks it in MLflow.
"""
