"""sparkml-dist: Spark-partitioned Parquet -> Petastorm -> PyTorch ranks in Horovod ring-AllReduce,
launched in a Spark barrier stage and tracked in MLflow, beside iterative-MapReduce baselines."""

__version__ = "0.1.0"
