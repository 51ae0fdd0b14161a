"""The data: inputs (Parquet, LIBSVM, synthetic) -> shards and their ``_manifest.json``, the contract the
ranks read (manifest, fingerprint, the sparse row format), and safe publication of every output directory.
Driver side, except ``manifest``, ``fingerprint`` and ``sparse``, which the ranks read too.

Imports nothing: importing one module of the group never loads the others."""
