"""sparkml-dist: Spark-partitioned Parquet -> Petastorm -> PyTorch ranks in Horovod ring-AllReduce,
launched in a Spark barrier stage and tracked in MLflow, beside iterative-MapReduce baselines."""

__version__ = "0.1.0"

import warnings as _warnings

# Petastorm 0.12 drives pyarrow 14's legacy ParquetDataset API (the reason for the pins, README "Setup"), and
# every such call warns that the API is deprecated: 120 lines per `make run`, none a user can act on. They are
# silenced at their source only (warnings attributed to petastorm's own modules), in the driver and in every
# Spark Python worker that imports this package; the same warnings from anywhere else still show.


def quiet_petastorm_warnings() -> None:
    """Install the filters (idempotent: an identical filter replaces the old one)."""
    for category in (FutureWarning, DeprecationWarning):
        _warnings.filterwarnings("ignore", category=category, module=r"petastorm(\.|$)")
    # The modern stack (README "Stacks") runs pandas 3 under pyspark 4.3, which warns on every pandas
    # conversion that pandas >= 3 is "not yet fully supported" (2-6 lines per job). The project's use of it
    # is tested on that stack (make test-modern); the choice and the warning are documented, so it is
    # silenced by its message only.
    _warnings.filterwarnings("ignore", r"PySpark does not yet fully support pandas >= 3", FutureWarning)


quiet_petastorm_warnings()

# The old flat module paths (sparkml_dist.train, sparkml_dist.ps.server, ...) still import, as the very modules
# that now live in the sub-packages: see _aliases.py.
from sparkml_dist import _aliases  # noqa: E402

_aliases.install()
