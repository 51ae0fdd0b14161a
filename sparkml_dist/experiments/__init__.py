"""MLflow: runs and what is logged in them (``tracking``, ``metric_names``), the spool that keeps them
through a tracking-store outage, the UI server on the project's store, model promotion in the registry.

Imports nothing: importing one module of the group never loads the others."""
